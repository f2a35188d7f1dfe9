"""The parts of main_pretrain.py before its loop (pretraining/engine.py): its command line, the run configuration
resolved from the flags and the data, the corpus, and the frozen-feature probe the loop runs."""

"""The parts of main_finetune.py: its command line, recipes, setups, model choice and reporting."""

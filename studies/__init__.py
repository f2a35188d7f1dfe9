"""Studies: the one-command recipes (launch/recipes/*.sh, `main_study.py`) that run the mains as a user would type
them and turn their outputs into one result: the demo, the MedMNIST recipe and the label-efficiency study on a
user's volumes."""

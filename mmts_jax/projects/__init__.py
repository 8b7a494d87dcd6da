"""Paper code beside MM-TS: Nakada et al. (AISTATS 2023) and EK-100 feature fine-tuning."""

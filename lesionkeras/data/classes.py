"""Names shared by every data layout: ISIC 2018 Task 2 attributes and Task 3 classes."""

# ISIC 2018 Task 2 dermoscopic attributes, in the order of the file names.
ATTRIBUTES = ("globules", "milia_like_cyst", "negative_network", "pigment_network", "streaks")
# ISIC 2018 Task 3 diagnoses, in the column order of its ground-truth CSV.
DIAGNOSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")

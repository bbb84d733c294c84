"""The record contract every dataset keeps (docs/INTERFACES.md, "Records"): the split names the
stages read and the smallest image side a run accepts.

Why a module of its own: the embedded generators (shapes, digits, natural), the image-token
files, the loader, the importer of users' images and the config validator all need the same
names and floor; written once here, an importer cannot make a split the trainer never reads or
store images smaller than any run could use.
"""

# Splits in the order the stages use them: train trains, validation scores during training,
# test is held out for the sample stage's eval.
SPLITS = ("train", "validation", "test")

# Smallest image side in pixels (data.image_size and an importer's --resize): below it the
# tokenizer's 3x3 convolutions and a 3x3 position grid have nothing left to see.
MIN_IMAGE_SIZE = 8

"""The vocabulary of the synthetic captions: class nouns and attribute words, real English.

Captions are built as `a <noun>, a <colour> <size> <noun> <action> <place>`: the noun names the
class, the four attribute words describe the sample-specific part of its latent code (see
`generator`). Real words matter: the MiniLM sentence encoder of the clustering stage must see
ordinary language.
"""

from __future__ import annotations

__all__ = ["CLASS_NOUNS", "ATTRIBUTES", "ATTRIBUTE_SLOTS", "CAPTION_TEMPLATE"]

# 64 concrete, mutually distinct nouns (animals, objects, vehicles, food, plants).
CLASS_NOUNS = (
  "dog",
  "cat",
  "horse",
  "bicycle",
  "guitar",
  "teapot",
  "umbrella",
  "tractor",
  "penguin",
  "lighthouse",
  "sandwich",
  "violin",
  "elephant",
  "kettle",
  "sailboat",
  "cactus",
  "rabbit",
  "helicopter",
  "pumpkin",
  "typewriter",
  "giraffe",
  "lantern",
  "motorcycle",
  "owl",
  "pineapple",
  "bulldozer",
  "camel",
  "telescope",
  "strawberry",
  "submarine",
  "tortoise",
  "piano",
  "zebra",
  "backpack",
  "dolphin",
  "windmill",
  "mushroom",
  "airplane",
  "parrot",
  "bookshelf",
  "squirrel",
  "trumpet",
  "lemon",
  "skateboard",
  "flamingo",
  "clock",
  "octopus",
  "scooter",
  "kangaroo",
  "candle",
  "broccoli",
  "canoe",
  "peacock",
  "microscope",
  "hedgehog",
  "bus",
  "butterfly",
  "accordion",
  "coconut",
  "train",
  "jellyfish",
  "wheelbarrow",
  "goat",
  "chandelier",
)

# Attribute slots, each with 8 words; a sample's word in a slot is a quantile bin of one latent
# coordinate, so neighbouring words are neighbouring latent values.
ATTRIBUTE_SLOTS = ("colour", "size", "action", "place")
ATTRIBUTES = {
  "colour": ("black", "blue", "green", "yellow", "orange", "red", "pink", "white"),
  "size": ("tiny", "small", "little", "compact", "medium", "large", "huge", "giant"),
  "action": (
    "sleeping",
    "resting",
    "standing",
    "waiting",
    "moving",
    "rolling",
    "running",
    "flying",
  ),
  "place": (
    "in a cellar",
    "in a kitchen",
    "in a garden",
    "on a street",
    "in a park",
    "on a beach",
    "on a mountain",
    "in the sky",
  ),
}

# The noun twice: the sentence encoder then weighs the class over the attributes, so K-Means on
# the caption embeddings follows the classes more closely (NMI ~0.76 vs ~0.70 with one mention).
CAPTION_TEMPLATE = "a {noun}, a {colour} {size} {noun} {action} {place}"

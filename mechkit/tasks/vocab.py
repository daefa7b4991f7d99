"""The word lists behind mechkit's word-level tokenizer and task generators.

Every word is a single token of the word-level tokenizer (``tokenizer.py``). The lists are
ordered and fixed: token ids are assigned in the order of ``all_words()``, so changing a
list changes every id (and invalidates the bundled models).

Splits used by the bundled models:

- ``IOI_TRAIN_NAMES`` / ``IOI_HELDOUT_NAMES``: names of the second list occur in the
  training corpus only in non-IOI sentences, never in an IOI sentence.
- ``POSITIVE_TRAIN`` / ``POSITIVE_HELDOUT`` (and the negative ones): a sentiment probe is
  fitted on sentences built from the ``*_TRAIN`` adjectives and tested on the ``*_HELDOUT``
  ones. All adjectives occur in the corpus reviews.
"""

from __future__ import annotations

SPECIAL_TOKENS = ["<bos>", "<eos>", "<pad>", "<unk>"]

PUNCTUATION = [".", ",", "!", "?", ":", ";"]

NAMES = [
    "Mary", "John", "Alice", "Bob", "Sarah", "James", "Emma", "David", "Laura", "Michael",
    "Anna", "Peter", "Julia", "Thomas", "Kate", "Daniel", "Sophie", "Mark", "Lucy", "Paul",
    "Helen", "George", "Rachel", "Simon", "Claire", "Henry", "Grace", "Adam", "Olivia", "Jack",
    "Emily", "Robert", "Hannah", "Steven", "Amy", "Richard", "Chloe", "Martin", "Ruth", "Oliver",
    # the last 20 are held out of IOI sentences in the training corpus
    "Linda", "Victor", "Nora", "Frank", "Ellen", "Oscar", "Irene", "Hugo", "Diana", "Felix",
    "Vera", "Ivan", "Rosa", "Leon", "Maya", "Carl", "Nina", "Owen", "Tessa", "Ralph",
]
IOI_TRAIN_NAMES = NAMES[:40]
IOI_HELDOUT_NAMES = NAMES[40:]

PLACES = [
    "store", "park", "school", "office", "market", "station", "garden", "library", "beach",
    "museum", "hospital", "restaurant", "cafe", "church", "bank", "farm", "river", "lake",
    "forest", "hotel", "airport", "theater", "gym", "bakery", "kitchen", "village", "city",
    "harbor", "castle", "zoo", "stadium", "bridge", "square", "mall", "garage", "studio",
]

OBJECTS = [
    "drink", "book", "ball", "key", "letter", "bag", "ring", "hat", "cake", "apple", "pen",
    "cup", "phone", "ticket", "box", "map", "coin", "flower", "card", "toy", "bottle", "camera",
    "basket", "lamp", "clock", "shirt", "scarf", "sandwich", "candle", "knife", "gift", "note",
    "plate", "jacket", "watch", "brush", "umbrella", "wallet", "pencil", "blanket",
]

# past-tense transitive verbs for filler sentences
VERBS = [
    "saw", "found", "took", "made", "moved", "cleaned", "painted", "opened", "closed", "carried",
    "dropped", "lifted", "washed", "checked", "bought", "sold", "lost", "kept", "held", "pushed",
    "pulled", "fixed", "used", "wanted", "needed", "liked", "watched", "noticed", "touched",
    "counted", "packed", "hid", "showed", "brought", "picked", "placed", "ordered", "shared",
    "borrowed", "returned",
]
# verbs used in IOI templates ("X gave a drink to")
GIVE_VERBS = ["gave", "handed", "passed", "sent", "offered", "threw", "showed", "brought"]

NEUTRAL_NOUNS = [
    "man", "woman", "child", "dog", "cat", "bird", "horse", "car", "bus", "train", "house",
    "door", "window", "table", "chair", "room", "road", "tree", "river", "sky", "sun", "rain",
    "wind", "day", "night", "morning", "evening", "week", "year", "friend", "teacher",
    "doctor", "farmer", "student", "worker", "driver", "family", "neighbor", "child", "boat",
    "wall", "floor", "roof", "paper", "picture", "song", "game", "story", "question", "answer",
    "water", "bread", "milk", "tea", "coffee", "soup", "rice", "fish", "egg", "box",
]

NEUTRAL_ADJECTIVES = [
    "red", "blue", "green", "yellow", "white", "black", "small", "large", "old", "new", "long",
    "short", "tall", "round", "square", "wooden", "heavy", "light", "warm", "cold", "quiet",
    "busy", "empty", "full", "early", "late", "open", "closed", "plain", "simple",
]

POSITIVE_ADJECTIVES = [
    "good", "great", "excellent", "wonderful", "lovely", "amazing", "fantastic", "brilliant",
    "superb", "delightful", "pleasant", "charming", "beautiful", "perfect", "enjoyable",
    "marvelous", "splendid", "terrific", "fabulous", "outstanding", "superb", "nice", "fine",
    "gorgeous", "stunning", "impressive", "excited", "happy", "cheerful", "joyful",
    "graceful", "elegant", "fresh", "tasty", "delicious", "friendly", "kind", "generous",
    "clever", "inspiring", "glorious", "remarkable",
]

NEGATIVE_ADJECTIVES = [
    "bad", "terrible", "awful", "horrible", "dreadful", "poor", "boring", "dull", "ugly",
    "nasty", "unpleasant", "disappointing", "annoying", "miserable", "painful", "sad",
    "rude", "mediocre", "lousy", "gross", "disgusting", "stale", "bland", "tedious",
    "clumsy", "awkward", "gloomy", "grim", "hostile", "cruel", "weak", "messy", "dirty",
    "broken", "useless", "pathetic", "shabby", "noisy", "rotten", "sloppy", "tasteless",
    "unbearable",
]


def _dedupe(words):
    seen, out = set(), []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


POSITIVE_ADJECTIVES = _dedupe(POSITIVE_ADJECTIVES)
NEGATIVE_ADJECTIVES = _dedupe(NEGATIVE_ADJECTIVES)
# the probe trains on the first 30 of each list and is tested on the rest
POSITIVE_TRAIN, POSITIVE_HELDOUT = POSITIVE_ADJECTIVES[:30], POSITIVE_ADJECTIVES[30:]
NEGATIVE_TRAIN, NEGATIVE_HELDOUT = NEGATIVE_ADJECTIVES[:30], NEGATIVE_ADJECTIVES[30:]

# things a review is about
REVIEW_NOUNS = [
    "movie", "film", "food", "meal", "service", "show", "book", "music", "hotel", "room",
    "staff", "acting", "plot", "ending", "price", "place", "concert", "play", "trip", "view",
]

FUNCTION_WORDS = [
    "the", "a", "an", "and", "or", "but", "to", "of", "in", "on", "at", "with", "from", "by",
    "for", "was", "were", "is", "are", "it", "he", "she", "they", "we", "I", "you", "that",
    "this", "then", "there", "very", "really", "quite", "so", "too", "not", "later", "soon",
    "after", "before", "when", "while", "because", "also", "had", "has", "have", "went",
    "came", "said", "thought", "think", "would", "could", "will", "lot", "fun", "some",
    "every", "overall", "recommend", "avoid", "loved", "hated", "again", "never", "always",
    "home", "back", "into", "out", "up", "down", "over", "under", "near", "decided", "give",
    "their", "his", "her", "my", "our", "together", "one", "two", "three", "all", "each",
    "When", "After", "While", "Then", "The", "Later", "Afterwards", "Yesterday", "Today",
    "friends", "were", "working", "walking", "playing", "had", "dinner", "lunch", "met",
    "arrived", "left", "spent", "time", "long", "argument", "happy", "about", "what", "who",
]


def all_words() -> list[str]:
    """Every ordinary (non-special) word of the vocabulary, in id order, without repeats."""
    return _dedupe(
        PUNCTUATION
        + NAMES
        + PLACES
        + OBJECTS
        + VERBS
        + GIVE_VERBS
        + NEUTRAL_NOUNS
        + NEUTRAL_ADJECTIVES
        + POSITIVE_ADJECTIVES
        + NEGATIVE_ADJECTIVES
        + REVIEW_NOUNS
        + FUNCTION_WORDS
    )


def vocabulary() -> dict[str, int]:
    """Word -> id: the special tokens first (``<bos>`` = 0), then ``all_words()``."""
    words = SPECIAL_TOKENS + all_words()
    return {w: i for i, w in enumerate(words)}


assert not set(POSITIVE_ADJECTIVES) & set(NEGATIVE_ADJECTIVES)
assert not set(NAMES) & set(FUNCTION_WORDS + NEUTRAL_NOUNS + PLACES + OBJECTS)

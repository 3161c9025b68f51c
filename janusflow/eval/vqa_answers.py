"""VQAv2 answer normalisation and accuracy, as the official evaluation script (GT-Vision-Lab/VQA, vqaEval.py) has them.

    normalize_vqa("Two dogs.")                          -> "2 dogs"
    vqa_accuracy("two", ["2", "2", "3", ...10 answers]) -> mean over the 10 leave-one-out subsets of
                                                           min(#matching answers among the other 9 / 3, 1)

The official script cleans whitespace, and only when the ten human answers are not all the same applies
processPunctuation then processDigitArticle to them and to the prediction. The prediction is normalised here
in every case, as the EvalAI answer processor does before a submission is scored (and lmms-eval's vqav2 task),
so a raw model answer "Yes" matches ten humans' "yes". The official quirks are kept, because scores must match:
the period rule's lookahead written where a lookbehind was meant, and ``re.UNICODE`` passed where ``re.sub``
takes its count (so at most 32 periods are removed).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern, lookahead "(?!<=" and all
COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(\,)(\d)")
OFFICIAL_PERIOD_COUNT = int(re.UNICODE)  # what the official call passes as re.sub's count


def clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """Drop a punctuation mark next to a space (or any, in a number like 3,000); others become spaces."""
    out = text
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or COMMA_BETWEEN_DIGITS.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD.sub("", out, count=OFFICIAL_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """Lower case, number words to digits, no articles, contractions given their apostrophe."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_vqa(text: str) -> str:
    return process_digit_article(process_punctuation(clean_whitespace(text)))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The VQA accuracy of one prediction against its human answers (10 in VQAv2), in [0, 1]."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    humans = [clean_whitespace(a) for a in answers]
    if len(set(humans)) > 1:
        humans = [process_digit_article(process_punctuation(a)) for a in humans]
    predicted = normalize_vqa(prediction)
    per_subset = [min(1.0, sum(other == predicted for j, other in enumerate(humans) if j != i) / 3)
                  for i in range(len(humans))]
    return sum(per_subset) / len(per_subset)

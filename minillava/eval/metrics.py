"""The benchmarks' official scoring rules, as pure functions of answer strings and ground truth.

Each function restates what the official scorer that LLaVA's evaluation scripts call computes,
quirks included, so that numbers are comparable with published tables:

- VQA accuracy (TextVQA, VizWiz): the EvalAI answer normalisation of `m4c_evaluator.py`, then
  min(1, matching humans / 3) averaged over the ten leave-one-out subsets of the human answers.
  VQAv2: the official VQA evaluation (`vqaEval.py`) on the answer as uploaded (EvalAI-normalised).
- POPE: `eval_pope.py`; MME: the MME `eval_tool/calculation.py`; GQA: `convert_gqa_for_eval.py`
  followed by the GQA `eval.py` exact match; ScienceQA: `eval_science_qa.py`.
- MMBench: its official score needs CircularEval and a GPT matcher; `mmbench_choice` is VLMEvalKit's
  exact matching (`can_infer`), for a local single-pass accuracy (see its docstring).

Rates are returned as fractions in [0, 1]; the tasks turn them into percentages.
"""

from __future__ import annotations

import re

# ----------------------------------------------------------------------------- VQA accuracy

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
           "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
PERIOD = re.compile(r"\.(?!\d)")  # a period not starting a decimal
DIGIT_COMMA = re.compile(r"(?<=\d)(,)+(?=\d)")


def normalize_vqa_answer(answer: str) -> str:
    """EvalAI's answer normalisation, exactly as `m4c_evaluator.EvalAIAnswerProcessor` runs it."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # Punctuation touching a space disappears, elsewhere it becomes a space. The test reads the
    # text as it was before any replacement, and the digit-comma test can never fire (commas went above).
    original, spaced = text, DIGIT_COMMA.search(text) is not None
    for p in PUNCTUATION:
        text = text.replace(p, "" if (p + " " in original or " " + p in original or spaced) else " ")
    text = PERIOD.sub("", text, count=32)  # the reference passes re.UNICODE (= 32) as the count
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


VQA_EVAL_COMMA = re.compile(r"(\d)(\,)(\d)")  # the official VQA evaluation's commaStrip (commas are still there)


def vqa_eval_clean(answer: str) -> str:
    """The official VQA evaluation's `processPunctuation` then `processDigitArticle` (GT-Vision-Lab/VQA
    vqaEval.py): as EvalAI's processor but without its first step (no lower-casing before the punctuation
    test, commas and "'s" left as they are, so its digit-comma test can fire)."""
    original, spaced = answer, VQA_EVAL_COMMA.search(answer) is not None
    text = answer
    for p in PUNCTUATION:
        text = text.replace(p, "" if (p + " " in original or " " + p in original or spaced) else " ")
    text = PERIOD.sub("", text, count=32)  # re.UNICODE (= 32) passed as the count, as there too
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqav2_score(prediction: str, human_answers: list[str]) -> float:
    """VQAv2 accuracy of one question as the official evaluation computes it (GT-Vision-Lab/VQA
    vqaEval.py, `VQAEval.evaluate`, the code EvalAI runs on an uploaded file): answers stripped of
    newlines, tabs and outer spaces; only when the humans disagree are their answers and the
    prediction cleaned (`vqa_eval_clean`); then min(1, matching others / 3) averaged over leaving each
    human out. `prediction` is the uploaded answer, already through EvalAI's processor."""
    flat = lambda a: a.replace("\n", " ").replace("\t", " ").strip()  # noqa: E731
    humans, pred = [flat(a) for a in human_answers], flat(prediction)
    if len(set(humans)) > 1:
        humans, pred = [vqa_eval_clean(a) for a in humans], vqa_eval_clean(pred)
    matches = humans.count(pred)
    return sum(min(1.0, (matches - (h == pred)) / 3) for h in humans) / len(humans) if humans else 0.0


def vqa_score(prediction: str, human_answers: list[str]) -> float:
    """VQA accuracy of one prediction: min(1, #matching humans / 3), averaged over leaving each human out."""
    humans = [normalize_vqa_answer(a) for a in human_answers]
    pred = normalize_vqa_answer(prediction)
    if pred not in humans:
        return 0.0
    matches = humans.count(pred)
    # Leaving out a human who gave `pred` leaves matches - 1 others, any other human leaves `matches`.
    total = matches * min(1.0, (matches - 1) / 3) + (len(humans) - matches) * min(1.0, matches / 3)
    return total / len(humans)


# ----------------------------------------------------------------------------- POPE

def pope_label(answer: str) -> str:
    """'no' if the answer's first sentence has the word No, no or not (commas dropped), else 'yes'."""
    first = answer.split(".")[0].replace(",", "")
    words = first.split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def pope_metrics(predictions: list[str], labels: list[str]) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio of yes/no predictions ('yes' is positive)."""
    pairs = list(zip(predictions, labels, strict=True))
    truth = [t != "no" for _, t in pairs]  # as eval_pope.py: any label but "no" is positive
    said_yes = [p != "no" for p, _ in pairs]
    tp = sum(s and t for s, t in zip(said_yes, truth))
    fp = sum(s and not t for s, t in zip(said_yes, truth))
    tn = sum(not s and not t for s, t in zip(said_yes, truth))
    fn = sum(not s and t for s, t in zip(said_yes, truth))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(pairs)
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n if n else 0.0, "tp": tp, "fp": fp, "tn": tn, "fn": fn}


# ----------------------------------------------------------------------------- MME

def mme_label(answer: str) -> str:
    """'yes', 'no' or 'other': the whole lower-cased answer, else whichever of yes/no its first 4 characters hold."""
    text = answer.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_category(groups: list[list[tuple[str, str]]]) -> dict:
    """Accuracy and accuracy-plus of one category; `groups` holds each image's (prediction, truth) pairs.

    acc: correct answers / questions; acc_plus: images with every question right / images.
    The category's score is 100 * (acc + acc_plus)."""
    correct = [[mme_label(p) == t.lower() for p, t in g] for g in groups]
    questions = sum(len(c) for c in correct)
    acc = sum(sum(c) for c in correct) / questions if questions else 0.0
    acc_plus = sum(all(c) for c in correct) / len(correct) if correct else 0.0
    return {"acc": acc, "acc_plus": acc_plus, "score": 100 * acc + 100 * acc_plus}


# ----------------------------------------------------------------------------- GQA

def gqa_normalize(answer: str) -> str:
    """LLaVA's `convert_gqa_for_eval.py`: trailing periods dropped, lower case; GQA then compares exactly."""
    return answer.rstrip(".").lower()


# ----------------------------------------------------------------------------- ScienceQA

SQA_OPTIONS = ["A", "B", "C", "D", "E"]
SQA_PATTERN = re.compile(r"The answer is ([A-Z]).")


def scienceqa_choice(answer: str, n_choices: int) -> int:
    """Index of the chosen option as `eval_science_qa.py` parses it, -1 if none (counted wrong).

    Accepted: a bare letter, "X. ..." at the start, or exactly one "The answer is X." in the text."""
    if answer in SQA_OPTIONS:
        letter = answer
    elif len(answer) >= 3 and answer[0] in SQA_OPTIONS and answer[1:3] == ". ":
        letter = answer[0]
    else:
        found = SQA_PATTERN.findall(answer)
        letter = found[0] if len(found) == 1 else "FAILED"
    options = SQA_OPTIONS[:n_choices]
    return options.index(letter) if letter in options else -1


# ----------------------------------------------------------------------------- MMBench

# VLMEvalKit's exact-matching rule, `can_infer` = `can_infer_option`, then `can_infer_text`
# (vlmeval/utils/matching_util.py at open-compass/VLMEvalKit e8e78f05, Aug 2026), which MMBench's
# evaluation (`vlmeval/dataset/utils/multiple_choice.py`, `extract_answer_from_item`) applies before
# its GPT matcher; without the GPT matcher ("exact_matching") an answer it cannot place is wrong.
MMB_SEPARATORS = re.compile(r"[.()\[\],:;!*#{}]")
MMB_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                "I'm sorry, but without the image provided", "Cannot determine the answer")
MMB_VERBOSE = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")  # "The answer is **B**"


def _mmbench_option(answer: str, options: dict[str, str]) -> str | None:
    """`can_infer_option`: a letter standing alone among the last 5 words, or "the answer is X";
    "Z" for a refusal (wrong, and no text matching after it); None if undecided."""
    if "Failed to obtain answer via API" in answer:
        return None
    if any(refusal in answer for refusal in MMB_REFUSALS):
        return "Z"
    words = MMB_SEPARATORS.sub(" ", answer).split()
    named = [letter for letter in options if letter in words]
    if len(named) == 1:
        if words.index(named[0]) > len(words) - 5:  # (VLMEvalKit's "A might be a quantifier" check is off by default)
            return named[0]
    elif not named and "Z" in words:
        return "Z"
    match = MMB_VERBOSE.search(answer)
    if match and match.group(1).upper() in options:
        return match.group(1).upper()
    return None


def _mmbench_text(answer: str, options: dict[str, str]) -> str | None:
    """`can_infer_text`: the one option whose text the (not too long) answer contains, case ignored."""
    text = answer.lower()
    if len(text) > 2 * sum(len(option) for option in options.values()):
        return None
    hits = [letter for letter, option in options.items() if option.lower() in text]
    return hits[0] if len(hits) == 1 else None


def mmbench_choice(answer: str, options: dict[str, str]) -> str | None:
    """The option letter an answer picks by MMBench's exact matching (VLMEvalKit's `can_infer`), or None.

    `options` maps letters to option texts ({"A": "cat", "B": "dog"}). The official score adds
    CircularEval and, for answers this cannot place, a GPT matcher (on the server); here those
    answers count as wrong, as VLMEvalKit's exact-matching mode counts them."""
    letter = _mmbench_option(answer, options) or _mmbench_text(answer, options)
    return letter if letter in options else None


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


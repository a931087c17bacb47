"""VQAv2 and MMBench-CN, the paper's prompts by default, and what a run cost.

The upload files and local scores are checked against literal transcriptions of the published code on
tricky answers: LLaVA's (haotian-liu/LLaVA c121f04) `llava/eval/m4c_evaluator.py` EvalAIAnswerProcessor,
`scripts/convert_vqav2_for_submission.py`, `scripts/convert_mmbench_for_submission.py` and the prompt of
`llava/eval/model_vqa_mmbench.py`, and the official VQA evaluation (GT-Vision-Lab/VQA a013f00,
`PythonEvaluationTools/vqaEvaluation/vqaEval.py`, VQAEval.evaluate, the code the EvalAI server runs).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest

from minillava import batch as B
from minillava.conversation import is_llava_vicuna
from minillava.eval import TASKS, runner
from minillava.eval import efficiency as E
from minillava.eval import metrics as M
from minillava.flops import LLAVA_7B, LLAVA_13B, LlmSpec, layered_prefill_flops, prefill_flops
from minillava.generate import Result
from minillava.schedule import build, layer_lengths
from tests import tiny
from tests.test_eval import SHORT, llava_answers, one_error_line, png_b64, pope_data, write_json, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "weights" / "llava-next-tiny-scenes"


# ============================================================================= transcriptions
# ---- llava/eval/m4c_evaluator.py, EvalAIAnswerProcessor: verbatim (the tables' line breaks merged)

class EvalAIAnswerProcessor:
    """
    Processes an answer similar to Eval AI
        copied from
        https://github.com/facebookresearch/mmf/blob/c46b3b3391275b4181567db80943473a89ab98ab/pythia/tasks/processors.py#L897
    """

    CONTRACTIONS = {
        "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
        "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
        "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
        "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
        "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
        "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
        "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
        "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
        "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
        "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
        "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
        "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
        "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
        "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
        "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
        "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
        "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
        "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
        "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
        "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
        "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
        "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
        "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
        "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
        "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
        "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
        "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
        "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
        "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
        "youll": "you'll", "youre": "you're", "youve": "you've",
    }

    NUMBER_MAP = {
        "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
        "seven": "7", "eight": "8", "nine": "9", "ten": "10",
    }
    ARTICLES = ["a", "an", "the"]
    PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
    COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
    PUNCTUATIONS = [
        ";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
        "!",
    ]

    def __init__(self, *args, **kwargs):
        pass

    def word_tokenize(self, word):
        word = word.lower()
        word = word.replace(",", "").replace("?", "").replace("'s", " 's")
        return word.strip()

    def process_punctuation(self, in_text):
        out_text = in_text
        for p in self.PUNCTUATIONS:
            if (p + " " in in_text or " " + p in in_text) or (
                re.search(self.COMMA_STRIP, in_text) is not None
            ):
                out_text = out_text.replace(p, "")
            else:
                out_text = out_text.replace(p, " ")
        out_text = self.PERIOD_STRIP.sub("", out_text, re.UNICODE)
        return out_text

    def process_digit_article(self, in_text):
        out_text = []
        temp_text = in_text.lower().split()
        for word in temp_text:
            word = self.NUMBER_MAP.setdefault(word, word)
            if word not in self.ARTICLES:
                out_text.append(word)
            else:
                pass
        for word_id, word in enumerate(out_text):
            if word in self.CONTRACTIONS:
                out_text[word_id] = self.CONTRACTIONS[word]
        out_text = " ".join(out_text)
        return out_text

    def __call__(self, item):
        item = self.word_tokenize(item)
        item = item.replace("\n", " ").replace("\t", " ").strip()
        item = self.process_punctuation(item)
        item = self.process_digit_article(item)
        return item


# ---- GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py, VQAEval: evaluate, processPunctuation,
# processDigitArticle and the set* helpers verbatim but for Python 3 (print statements and the progress bar
# dropped, tabs as spaces); its contractions and manualMap are EvalAIAnswerProcessor's tables (checked equal
# when this was written: mmf copied them from here). `vqa` and `vqaRes` are objects with `.qa`, as its VQA class.

class VQAEval:
    def __init__(self, vqa, vqaRes, n=2):
        self.n            = n
        self.accuracy     = {}
        self.evalQA       = {}
        self.evalQuesType = {}
        self.evalAnsType  = {}
        self.vqa          = vqa
        self.vqaRes       = vqaRes
        self.params       = {'question_id': list(vqa.qa)}
        self.contractions = dict(EvalAIAnswerProcessor.CONTRACTIONS)
        self.manualMap    = { 'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4',
                              'five': '5', 'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10' }
        self.articles     = ['a', 'an', 'the']
        self.periodStrip  = re.compile("(?!<=\\d)(\\.)(?!\\d)")
        self.commaStrip   = re.compile("(\\d)(\\,)(\\d)")
        self.punct        = [';', r"/", '[', ']', '"', '{', '}',
                             '(', ')', '=', '+', '\\', '_', '-',
                             '>', '<', '@', '`', ',', '?', '!']

    def evaluate(self, quesIds=None):
        if quesIds == None:
            quesIds = [quesId for quesId in self.params['question_id']]
        gts = {}
        res = {}
        for quesId in quesIds:
            gts[quesId] = self.vqa.qa[quesId]
            res[quesId] = self.vqaRes.qa[quesId]
        accQA       = []
        accQuesType = {}
        accAnsType  = {}
        step = 0
        for quesId in quesIds:
            for ansDic in gts[quesId]['answers']:
                ansDic['answer'] = ansDic['answer'].replace('\n', ' ')
                ansDic['answer'] = ansDic['answer'].replace('\t', ' ')
                ansDic['answer'] = ansDic['answer'].strip()
            resAns = res[quesId]['answer']
            resAns = resAns.replace('\n', ' ')
            resAns = resAns.replace('\t', ' ')
            resAns = resAns.strip()
            gtAcc = []
            gtAnswers = [ans['answer'] for ans in gts[quesId]['answers']]

            if len(set(gtAnswers)) > 1:
                for ansDic in gts[quesId]['answers']:
                    ansDic['answer'] = self.processPunctuation(ansDic['answer'])
                    ansDic['answer'] = self.processDigitArticle(ansDic['answer'])
                resAns = self.processPunctuation(resAns)
                resAns = self.processDigitArticle(resAns)

            for gtAnsDatum in gts[quesId]['answers']:
                otherGTAns = [item for item in gts[quesId]['answers'] if item!=gtAnsDatum]
                matchingAns = [item for item in otherGTAns if item['answer']==resAns]
                acc = min(1, float(len(matchingAns))/3)
                gtAcc.append(acc)
            quesType    = gts[quesId]['question_type']
            ansType     = gts[quesId]['answer_type']
            avgGTAcc = float(sum(gtAcc))/len(gtAcc)
            accQA.append(avgGTAcc)
            if quesType not in accQuesType:
                accQuesType[quesType] = []
            accQuesType[quesType].append(avgGTAcc)
            if ansType not in accAnsType:
                accAnsType[ansType] = []
            accAnsType[ansType].append(avgGTAcc)
            self.setEvalQA(quesId, avgGTAcc)
            self.setEvalQuesType(quesId, quesType, avgGTAcc)
            self.setEvalAnsType(quesId, ansType, avgGTAcc)
            step = step + 1

        self.setAccuracy(accQA, accQuesType, accAnsType)

    def processPunctuation(self, inText):
        outText = inText
        for p in self.punct:
            if (p + ' ' in inText or ' ' + p in inText) or (re.search(self.commaStrip, inText) != None):
                outText = outText.replace(p, '')
            else:
                outText = outText.replace(p, ' ')
        outText = self.periodStrip.sub("",
                                      outText,
                                      re.UNICODE)
        return outText

    def processDigitArticle(self, inText):
        outText = []
        tempText = inText.lower().split()
        for word in tempText:
            word = self.manualMap.setdefault(word, word)
            if word not in self.articles:
                outText.append(word)
            else:
                pass
        for wordId, word in enumerate(outText):
            if word in self.contractions:
                outText[wordId] = self.contractions[word]
        outText = ' '.join(outText)
        return outText

    def setAccuracy(self, accQA, accQuesType, accAnsType):
        self.accuracy['overall']         = round(100*float(sum(accQA))/len(accQA), self.n)
        self.accuracy['perQuestionType'] = {quesType: round(100*float(sum(accQuesType[quesType]))/len(accQuesType[quesType]), self.n) for quesType in accQuesType}
        self.accuracy['perAnswerType']   = {ansType:  round(100*float(sum(accAnsType[ansType]))/len(accAnsType[ansType]), self.n) for ansType in accAnsType}

    def setEvalQA(self, quesId, acc):
        self.evalQA[quesId] = round(100*acc, self.n)

    def setEvalQuesType(self, quesId, quesType, acc):
        if quesType not in self.evalQuesType:
            self.evalQuesType[quesType] = {}
        self.evalQuesType[quesType][quesId] = round(100*acc, self.n)

    def setEvalAnsType(self, quesId, ansType, acc):
        if ansType not in self.evalAnsType:
            self.evalAnsType[ansType] = {}
        self.evalAnsType[ansType][quesId] = round(100*acc, self.n)


class QA:
    """What VQAEval reads of its VQA objects: `qa`, question id -> annotation (or result)."""

    def __init__(self, qa):
        self.qa = qa


# ---- scripts/convert_vqav2_for_submission.py, its __main__ block verbatim, with its three paths as arguments

def convert_vqav2_for_submission(src, test_split, dst):
    results = []
    error_line = 0
    for line_idx, line in enumerate(open(src)):
        try:
            results.append(json.loads(line))
        except:  # noqa: E722
            error_line += 1

    results = {x['question_id']: x['text'] for x in results}
    test_split = [json.loads(line) for line in open(test_split)]
    split_ids = set([x['question_id'] for x in test_split])  # noqa: F841

    all_answers = []

    answer_processor = EvalAIAnswerProcessor()

    for x in test_split:
        if x['question_id'] not in results:
            all_answers.append({
                'question_id': x['question_id'],
                'answer': ''
            })
        else:
            all_answers.append({
                'question_id': x['question_id'],
                'answer': answer_processor(results[x['question_id']])
            })

    with open(dst, 'w') as f:
        json.dump(all_answers, open(dst, 'w'))


# ---- scripts/convert_mmbench_for_submission.py, its __main__ block verbatim; the frame is returned instead
# of written with to_excel (openpyxl is not installed here; the frame is what it writes)

def convert_mmbench_for_submission(annotation_file, result_file):
    import pandas as pd

    df = pd.read_table(annotation_file)

    cur_df = df.copy()
    cur_df = cur_df.drop(columns=['hint', 'category', 'source', 'image', 'comment', 'l2-category'])
    cur_df.insert(6, 'prediction', None)
    for pred in open(result_file):
        pred = json.loads(pred)
        cur_df.loc[df['index'] == pred['question_id'], 'prediction'] = pred['text']
    return cur_df


# ---- llava/eval/model_vqa_mmbench.py: is_none, get_options and the prompt of one round (--single-pred-prompt,
# mm_use_im_start_end False), verbatim; returns (cur_prompt, qs without its leading "<image>\n")

all_options = ['A', 'B', 'C', 'D']


def is_none(value):
    if value is None:
        return True
    if type(value) is float and math.isnan(value):
        return True
    if type(value) is str and value.lower() == 'nan':
        return True
    if type(value) is str and value.lower() == 'none':
        return True
    return False


def get_options(row, options):
    parsed_options = []
    for option in options:
        option_value = row[option]
        if is_none(option_value):
            break
        parsed_options.append(option_value)
    return parsed_options


def mmbench_prompt(row, lang):
    options = get_options(row, all_options)
    question = row['question']
    hint = row['hint']
    if not is_none(hint):
        question = hint + '\n' + question
    for option_char, option in zip(all_options[:len(options)], options):
        question = question + '\n' + option_char + '. ' + option
    qs = cur_prompt = question
    qs = '<image>' + '\n' + qs
    if lang == 'cn':
        qs = qs + '\n' + "请直接回答选项字母。"
    else:
        qs = qs + '\n' + "Answer with the option's letter from the given choices directly."
    return cur_prompt, qs[len('<image>\n'):]


# ============================================================================= VQAv2

TRICKY = ["Two.", "1,000 dogs", "The Coca-Cola!", "It's a dog's toy", "yes\nno", "  Yes  ", "3.5 dont",
          "x - y", "none", "a/b", "\"quoted\"", "it is 12:30", "TEN", "", "well, 2,5", "ain't", "(blue)",
          "mightnt've", "$5.00", "one two three", "red, white"]
HUMANS = [  # ten human answers of one question each, as VQAv2's annotations hold them
    ["2"] * 3 + ["two"] * 2 + ["3"] * 5,  # disagreement: everything cleaned
    ["yes"] * 10,  # agreement: compared raw, only stripped
    ["Yes"] * 10,  # agreement with a capital: "yes" does not match
    ["1,000 dogs"] * 4 + ["1000 dogs"] * 6,  # the digit-comma rule fires on the humans' side
    ["coca cola"] * 2 + ["coca-cola"] * 2 + ["Coca-Cola!"] + ["coke"] * 5,
    ["it's dog's toy"] * 3 + ["toy"] * 7,
    ["12:30"] * 5 + ["12 30"] * 5,
    ["blue"] * 9 + ["(blue)"],
    ["red white"] * 3 + ["red, white"] * 3 + ["red"] * 4,
    ["0"] * 3 + ["none"] * 3 + ["zero"] * 4,
]


def vqav2_annotation(qid: int, humans: list[str], answer_type: str) -> dict:
    return {"question_id": qid, "image_id": qid // 10, "question_type": "what", "answer_type": answer_type,
            "multiple_choice_answer": humans[0],
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(humans)]}


def test_evalai_processor_and_vqa_accuracy_are_the_published_code():
    process = EvalAIAnswerProcessor()
    for answer in TRICKY + [h for humans in HUMANS for h in humans]:
        assert M.normalize_vqa_answer(answer) == process(answer), answer
    for k, humans in enumerate(HUMANS):
        for answer in TRICKY + humans:
            uploaded = process(answer)
            official = VQAEval(QA({k: vqav2_annotation(k, list(humans), "other")}), QA({k: {"answer": uploaded}}))
            official.evaluate()
            assert round(100 * M.vqav2_score(uploaded, humans), 2) == official.evalQA[k], (answer, humans)


def vqav2_data(root: Path, n_test: int = 7) -> tuple[Path, list[dict]]:
    """VQAv2 in LLaVA's layout: test-dev questions 1..5 (text ending in the short-answer instruction),
    the whole test2015 file 1..n_test (test-dev is part of it), annotations for questions 1..4."""
    data = root / "vqav2"
    (data / "test2015").mkdir(parents=True)
    rows = [{"question_id": q * 1000 + 7, "image": f"COCO_test2015_{q:012d}.jpg", "text": f"What is {q}?" + SHORT,
             "category": "default"} for q in range(1, n_test + 1)]
    write_jsonl(data / "llava_vqav2_mscoco_test-dev2015.jsonl", rows[:5])
    write_jsonl(data / "llava_vqav2_mscoco_test2015.jsonl", rows)
    types = ["number", "yes/no", "yes/no", "other"]
    write_json(data / "v2_mscoco_val2014_annotations.json",
               {"info": {}, "annotations": [vqav2_annotation(rows[i]["question_id"], HUMANS[[0, 1, 2, 4][i]], t)
                                            for i, t in enumerate(types)]})
    return data, rows


@pytest.mark.parametrize("limit", [None, 3])
def test_vqav2_upload_file_and_local_score(tmp_path, capsys, limit):
    data, rows = vqav2_data(tmp_path)
    texts = ["Two.", "yes", "yes", "The Coca-Cola!", "  A dog\tsleeping."]
    answers = llava_answers(tmp_path / "answers.jsonl", [(r["question_id"], t) for r, t in zip(rows, texts)])
    extra = ["--limit", str(limit)] if limit else []
    code = runner.main(["vqav2", "--data", str(data), "--score-only", "--answers", str(answers), *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    line = json.loads(out.splitlines()[0])
    assert TASKS["vqav2"].load(data)[0].prompt == rows[0]["text"]  # the file's text, instruction included

    # the upload file: convert_vqav2_for_submission.py on the answers this run scored (LLaVA's merge.jsonl)
    merged = tmp_path / "merge.jsonl"
    merged.write_text("".join(answers.read_text().splitlines(keepends=True)[: limit or None]))
    convert_vqav2_for_submission(merged, data / "llava_vqav2_mscoco_test2015.jsonl", tmp_path / "llava.json")
    assert Path(line["submission"]).read_bytes() == (tmp_path / "llava.json").read_bytes()
    upload = json.loads((tmp_path / "llava.json").read_text())
    assert len(upload) == 7 and upload[0] == {"question_id": 1007, "answer": "2"} and upload[6]["answer"] == ""

    # the local score: the official evaluation of the uploaded answers of the annotated questions
    annotations = json.loads((data / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]
    scored = {a["question_id"]: a for a in annotations}
    scored = {q: a for q, a in scored.items() if any(u["question_id"] == q and q in
              [r["question_id"] for r in rows[: limit or 5]] for u in upload)}
    official = VQAEval(QA(copy.deepcopy(scored)), QA({u["question_id"]: u for u in upload if u["question_id"] in scored}))
    official.evaluate()
    assert line["metrics"]["graded"] == len(scored)
    assert line["metrics"]["accuracy"] == pytest.approx(official.accuracy["overall"], abs=0.005)
    assert line["metrics"]["answer_types"] == pytest.approx(official.accuracy["perAnswerType"], abs=0.005)
    assert line["score"] == line["metrics"]["accuracy"] and line["headline"] == "accuracy"


def test_vqav2_test_dev_alone(tmp_path, capsys):
    """Without annotations: no local score, a note; without the test2015 file, the upload lists the question file's."""
    data, rows = vqav2_data(tmp_path)
    (data / "v2_mscoco_val2014_annotations.json").unlink()
    (data / "llava_vqav2_mscoco_test2015.jsonl").unlink()
    answers = llava_answers(tmp_path / "a.jsonl", [(r["question_id"], "One") for r in rows[:5]])
    assert runner.main(["vqav2", "--data", str(data), "--score-only", "--answers", str(answers)]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert line["score"] is None and "EvalAI" in line["metrics"]["note"]
    assert json.loads(Path(line["submission"]).read_text()) == [{"question_id": r["question_id"], "answer": "1"} for r in rows[:5]]


# ============================================================================= MMBench-CN

MMB_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
              "comment", "split"]


def mmbench_tsv(path: Path, rows: list[list]) -> Path:
    lines = ["\t".join(MMB_HEADER)] + ["\t".join(map(str, r[:8] + ["cat", png_b64(r[0]), "src", "l2", "nan", "dev"]))
                                       for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


CN_ROWS = [
    [0, "图中是什么动物？", "nan", "猫", "狗", "nan", "nan", "A"],
    [1, "这是什么颜色？", "仔细看。", "红色", "绿色", "蓝色", "", "C"],
    [2, "有几个？", "", "一个", "两个", "None", "", "B"],
    [3, "哪一个？", "nan", "是", "否", "", "", "A"],
    [7, "Mixed English 问题?", "A hint: 提示", "yes", "no", "maybe", "none of them", "D"],
]


def test_mmbench_cn_prompt_is_model_vqa_mmbench_lang_cn(tmp_path):
    pd = pytest.importorskip("pandas")
    path = mmbench_tsv(tmp_path / "mmbench_cn" / "mmbench_dev_cn_20231003.tsv", CN_ROWS)
    ours = TASKS["mmbench-cn"].load(path.parent)
    theirs = [mmbench_prompt(row, "cn") for _, row in pd.read_table(path).iterrows()]
    assert [(q.text, q.prompt) for q in ours] == theirs
    assert ours[0].prompt.endswith("\n请直接回答选项字母。") and TASKS["mmbench-cn"].paper_template == "vicuna_v1"
    en = TASKS["mmbench"].load(mmbench_tsv(tmp_path / "mmbench" / "mmbench_dev_20230712.tsv", CN_ROWS).parent)
    assert [(q.text, q.prompt) for q in en] == [mmbench_prompt(row, "en") for _, row in pd.read_table(path).iterrows()]


@pytest.mark.parametrize("task", ["mmbench", "mmbench-cn"])
def test_mmbench_upload_file_is_convert_mmbench_for_submission(tmp_path, capsys, task):
    pd = pytest.importorskip("pandas")
    tsv = mmbench_tsv(tmp_path / task / TASKS[task].questions_file, CN_ROWS)
    texts = ["A", "C。因为\t它是蓝色", "B\n两个", "(A) 是", "我不知道"]
    answers = llava_answers(tmp_path / "a.jsonl", zip([r[0] for r in CN_ROWS], texts))
    code = runner.main([task, "--data", str(tsv.parent), "--score-only", "--answers", str(answers)])
    out, err = capsys.readouterr()
    assert code == 0, err
    line = json.loads(out.splitlines()[0])
    theirs = convert_mmbench_for_submission(tsv, answers)
    ours = pd.read_table(line["submission"])
    pd.testing.assert_frame_equal(ours.astype(str), theirs.astype(str))  # cells as read back (pandas' own dtypes)
    assert ours["prediction"].tolist() == texts
    # "A" right; "C。..." names no letter alone (one word to VLMEvalKit's matcher) but holds option C's
    # text: right; "B\n两个" picks B: right; "(A) 是" picks A: right; "我不知道" picks nothing: wrong. 4 of 5.
    assert line["metrics"] == {"accuracy": 80.0, "graded": 5}


# ============================================================================= the paper's template by default

VICUNA_CHAT = ("{% for message in messages %}{{ message['role'].upper() + ': ' }}{{ message['content'] }}{% endfor %}"
               "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")  # llava-hf's Vicuna kind


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def dress_as_vicunas(root: Path, checkpoints: dict) -> dict[str, Path]:
    """The tiny random model dressed as the released Vicuna checkpoints, in `root`: llava-hf's (a chat
    template) and liuhaotian's (original layout, its name). tests/test_lmms.py uses them too."""
    hf = copy_checkpoint(checkpoints["hub"], root / "hf")
    (hf / "chat_template.json").write_text(json.dumps({"chat_template": VICUNA_CHAT}))
    original = copy_checkpoint(checkpoints["original"], root / "llava-v1.6-vicuna-7b")
    return {"hf": hf, "original": original}


@pytest.fixture(scope="module")
def vicunas(tmp_path_factory, checkpoints):
    return dress_as_vicunas(tmp_path_factory.mktemp("vicuna"), checkpoints)


def test_vicuna_checkpoints_get_the_scripts_template(checkpoints, vicunas):
    for task in ("vqav2", "mmbench-cn", "textvqa", "pope", "mme", "gqa", "scienceqa", "mmbench", "vizwiz", "mmvet"):
        assert TASKS[task].paper_template == "vicuna_v1"  # scripts/v1_5/eval/*.sh: --conv-mode vicuna_v1
        for model in vicunas.values():
            assert runner.eval_template(model, TASKS[task].paper_template, None) == ("vicuna_v1", "llava_v1")
            assert runner.eval_template(model, TASKS[task].paper_template, "llava_v1") == ("llava_v1", "llava_v1")  # the flag wins
        for model in (checkpoints["hub"], checkpoints["original"], SHIPPED):  # no released Vicuna: their own
            assert runner.eval_template(model, TASKS[task].paper_template, None) == ("llava_v1", "llava_v1")
    assert runner.eval_template(vicunas["hf"], TASKS["synthetic"].paper_template, None) == ("llava_v1", "llava_v1")  # no LLaVA script
    assert is_llava_vicuna(checkpoints["hub"], "hf", "llava_v1", 32000)  # Vicuna's vocabulary says it too
    assert not is_llava_vicuna(vicunas["hf"], "hf", "mistral_instruct", 32000)


def test_answers_file_records_the_template(tmp_path, capsys, checkpoints, vicunas, monkeypatch):
    data = pope_data(tmp_path, images=True)
    asked = []
    real = runner.generate_batch
    monkeypatch.setattr(runner, "generate_batch", lambda *a, **k: asked.append(a[1].template.name) or real(*a, **k))
    out = tmp_path / "vicuna.jsonl"
    args = ["pope", "--data", str(data), "--max-new-tokens", "2", "--limit", "2"]
    assert runner.main([*args, "--output", str(out), "--model", str(vicunas["hf"])]) == 0
    assert set(asked) == {"vicuna_v1"}
    assert [json.loads(x)["metadata"]["conv_template"] for x in out.read_text().splitlines()] == ["vicuna_v1"] * 2
    capsys.readouterr()
    code = runner.main([*args, "--limit", "3", "--output", str(out), "--model", str(vicunas["hf"]), "--conv-template", "llava_v1"])
    one_error_line(code, capsys.readouterr().err, "other settings", "conv_template vicuna_v1 -> llava_v1")

    # a file from before templates were recorded was made with the checkpoint's own (llava_v1): it resumes
    # for the tiny model, and is refused where the default is now the paper's
    legacy = tmp_path / "legacy.jsonl"
    for model, ok in ((checkpoints["hub"], True), (vicunas["hf"], False)):
        records = [json.loads(x) for x in out.read_text().splitlines()]
        for r in records:
            del r["metadata"]["conv_template"]
        legacy.write_text("".join(json.dumps(r) + "\n" for r in records))
        code = runner.main([*args, "--limit", "3", "--output", str(legacy), "--model", str(model)])
        err = capsys.readouterr().err
        if ok:
            assert code == 0 and json.loads(legacy.read_text().splitlines()[2])["metadata"]["conv_template"] == "llava_v1"
        else:
            one_error_line(code, err, "other settings", "conv_template llava_v1 -> vicuna_v1")


# ============================================================================= what a run cost

def test_flops_per_question_are_the_tables():
    """docs/speed.md's table (scripts/bench.py `theory`): LLaVA-NeXT-7B, a 64-token prompt and a 672 x 672
    image of 2928 tokens at r = 1, 766 at 0.25, 334 at 0.1: 43.4 / 11.1 / 5.2 TFLOPs. The same count, per
    question, from the token numbers of a question's Result."""
    spec = importlib.util.spec_from_file_location("bench_script", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_script"] = bench  # dataclasses look their module up here
    spec.loader.exec_module(bench)
    assert bench.prefill_flops is prefill_flops  # one function for the table and the harness
    for image, tflops in ((2928, 43.4), (766, 11.1), (334, 5.2)):
        result = Result("", [5, 6, 2], {"before": 2928, "after": image},
                        {"own_prefill": 0.1, "first_token": 0.3, "own_decode": 0.05})
        cost = E.question_cost(result, 64, LLAVA_7B)
        assert cost.prefill_flops == prefill_flops(LLAVA_7B, 64 + image)["total"]
        assert round(cost.prefill_flops / 1e12, 1) == tflops
        assert (cost.decode_tokens, cost.prefill_s, cost.ttft_s, cost.decode_s) == (2, 0.1, 0.3, 0.05)
    # FastV: layers 0 .. K-1 see every token, K .. L-1 the kept ones; the lm_head once
    spec = LlmSpec("hand", layers=4, hidden=8, intermediate=16, heads=2, kv_heads=2, vocab=10)
    per_layer = lambda t: (prefill_flops(spec, t)["total"] - 2 * 8 * 10) // 4  # noqa: E731
    assert layered_prefill_flops(spec, [50, 50, 20, 20]) == 2 * per_layer(50) + 2 * per_layer(20) + 2 * 8 * 10
    assert layered_prefill_flops(LLAVA_13B, [900] * 40) == prefill_flops(LLAVA_13B, 900)["total"]
    with pytest.raises(ValueError, match="3 layer token counts for a decoder of 4 layers"):
        layered_prefill_flops(spec, [50, 50, 20])


def test_summary_arithmetic():
    cost = lambda p, t, n, d, flops=10**12, mean=None: E.QuestionCost(100, 25, mean, flops, 10**11, p, t, n, d)  # noqa: E731
    costs = [cost(0.2, 0.5, 9, 0.1), cost(0.2, 0.5, 3, 0.1), cost(0.1, 0.3, 0, 0.0, 3 * 10**12)]
    out = E.summary(costs, [{"wall_s": 2.0, "peak_rss_mib": 300.0}, {"wall_s": 3.0, "peak_rss_mib": 400.0}])
    assert out == pytest.approx({"measured": 3, "visual_tokens_before": 100, "visual_tokens_after": 25,
                                 "prefill_tflops": 5 / 3, "tower_tflops": 0.1, "prefill_ms": 500 / 3,
                                 "ttft_ms": 1300 / 3, "decode_tokens_per_s": 12 / 0.2, "samples_per_s": 1.0,
                                 "peak_rss_mib": 400.0})
    # a decoder-side method's questions: the tokens averaged over the layers too
    layered = E.summary([cost(0.2, 0.5, 9, 0.1, mean=60.0), cost(0.2, 0.5, 3, 0.1, mean=40.0)], [{"wall_s": 1.0}])
    assert layered["visual_tokens_layer_mean"] == 50.0 and list(layered)[3] == "visual_tokens_layer_mean"
    assert E.summary([], []) is None
    assert E.relative({"measured": 3, "prefill_ms": 50.0, "peak_rss_mib": 10}, {"prefill_ms": 200.0, "peak_rss_mib": 0}) \
        == {"prefill_ms": 25.0}


@pytest.fixture(scope="module")
def deep(tmp_path_factory, tokenizer_path):
    """A tiny random checkpoint with 4 decoder layers: FastV prunes after layer 2."""
    hf = tiny.hf_model(seed=5, num_hidden_layers=4)
    return tiny.save_checkpoint(hf, tmp_path_factory.mktemp("deep") / "hub", "hub", tokenizer_path, shards=1)


@pytest.mark.parametrize("compressor", ["globalcom2", "fastv"])
def test_run_reports_what_each_question_cost(tmp_path, capsys, deep, monkeypatch, compressor):
    """Each question's FLOPs are the count of its real prompt (the length prepare gave the decoder), its
    timings are positive and its time to first token covers its prefill; the summary line carries them,
    relative to an uncompressed run with --compare."""
    data = pope_data(tmp_path, images=True)
    model = deep
    lengths, costs = [], []  # in question order, both (every image here can be read)
    real_prepare, real_cost = B.prepare, E.question_cost
    monkeypatch.setattr(B, "prepare", lambda *a: lengths.append((p := real_prepare(*a)).embeds.shape[0]) or p)
    monkeypatch.setattr(E, "question_cost", lambda *a: costs.append((a, c := real_cost(*a))) or c)
    args = ["pope", "--data", str(data), "--model", str(model), "--max-new-tokens", "4", "--batch-size", "3"]
    assert runner.main([*args, "--output", str(tmp_path / "none.jsonl"), "--compressor", "none"]) == 0
    base = capsys.readouterr().out
    (tmp_path / "none.txt").write_text(base)
    lengths.clear(), costs.clear()
    assert runner.main([*args, "--output", str(tmp_path / "c.jsonl"), "--compressor", compressor,
                        "--compare", str(tmp_path / "none.txt")]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])

    spec = LlmSpec.from_text("tiny", runner.load_config(model).text)
    assert len(costs) == 7
    for length, ((result, text, _, method, ratio, tile), cost) in zip(lengths, costs, strict=True):
        kept = text + result.visual_tokens["after"]
        assert (method, ratio) == (compressor, 0.25)  # the run's, from which the schedule is rebuilt
        if compressor == "fastv":  # the decoder gets every token; layers from K = 2 on keep `kept`
            assert length == text + result.visual_tokens["before"]
            pruned = layered_prefill_flops(spec, [length, length, kept, kept])
            assert cost.prefill_flops == pruned < prefill_flops(spec, length)["total"]
        else:
            assert length == kept
            assert cost.prefill_flops == prefill_flops(spec, length)["total"]
        assert 0 < cost.prefill_s <= cost.ttft_s and cost.decode_s >= 0 and 0 <= cost.decode_tokens <= 3
        assert cost.tower_flops == result.tiles * tile > 0  # every tile, each at the tower's full count here
        layers = [text + n for n in layer_lengths(build(method, 0, result.visual_tokens["before"], ratio, 4),
                                                  result.visual_tokens["before"], 4)]
        assert cost.visual_layer_mean == (sum(layers) / 4 - text if compressor == "fastv" else None)
    eff = line["efficiency"]
    assert eff["measured"] == 7 and set(eff) == {"measured", "visual_tokens_before", "visual_tokens_after",
                                                  "prefill_tflops", "tower_tflops", "prefill_ms", "ttft_ms",
                                                  "decode_tokens_per_s", "samples_per_s", "peak_rss_mib",
                                                  *(["visual_tokens_layer_mean"] if compressor == "fastv" else [])}
    assert all(eff[k] > 0 for k in eff if k != "decode_tokens_per_s") and eff["ttft_ms"] >= eff["prefill_ms"]
    assert round(eff["visual_tokens_after"], 1) == line["visual_tokens"]["after"]  # the same questions
    rel = line["relative"]["efficiency"]
    assert rel["visual_tokens_before"] == 100 and rel["visual_tokens_after"] < 100 and rel["prefill_tflops"] < 100
    assert set(rel) == set(eff) - {"measured", "visual_tokens_layer_mean"} - (  # the base has no layer mean
        {"decode_tokens_per_s"} if not eff["decode_tokens_per_s"] else set())

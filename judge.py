"""Instruction-following answers and their scores: a model's answers file, an LLM judge, and scores
that need no LLM. `evaluate.py instruct` (write_answers) and `evaluate.py judge` (score_answers) are
the post's second yardstick, after finetune_instructions.py; evaluate.py keeps their command lines.

Giles Thomas first had a judge score one answer per prompt (the book's chapter 7 method) and found
it inconsistent, so his later code shows the judge every model's answer to an item in one prompt, in
a shuffled order, labelled Model 1, Model 2, ..., and asks for JSON scores. This does that:

- The order of the models for item i comes from random.Random(f"{seed}:{i}"), recorded with each
  judgment, so it is the same on every run with the same seed.
- Any OpenAI-compatible chat completions endpoint: OpenAI (OPENAI_API_KEY), or a local ollama,
  llama.cpp or vLLM server (--api-base). Network failures and HTTP 429/5xx are retried with
  exponential backoff; a reply that is not the JSON asked for is asked again, and an item that
  never gets one is counted and reported, not dropped.
- Every judgment is appended to a cache file keyed by the judge model and the exact prompt, so a
  rerun, or a run after a crash, sends only what was never answered.

Without a judge: ROUGE-L (the longest common word subsequence with the reference answer, as an F
score; tokenized as Google's rouge-score package does) and each answer's reference loss (written by
`evaluate.py instruct`). Means come with a 95% bootstrap confidence interval over items.

An answers file is JSONL, one record per test item in order: the item's fields, the model's greedy
answer, its name, and the loss of the reference answer. It is written to PATH.partial line by line
(an interrupted run resumes there) and renamed to PATH when every answer is in.
"""

import hashlib
import json
import os
import random
import re
import sys
import time
import urllib.error
import urllib.request

import numpy as np
from tqdm import tqdm

import cli
import files
import gpt
import instructions
import reference

API_BASE = "https://api.openai.com/v1"
TIMEOUT = 120.0                 # seconds per request; a long reply from a slow local model takes a while
RETRIES = 5                     # after a network failure or HTTP 429/5xx; waits RETRY_WAIT x 2^attempt
RETRY_WAIT = 2.0                # seconds
ASKS_PER_ITEM = 3               # a reply that is not the JSON asked for is asked again, up to this many times
CACHE = os.path.join("out", "judge_cache.jsonl")
SEED = 123
BOOTSTRAP_RESAMPLES = 10_000
CONFIDENCE = 0.95


class JudgeError(Exception):
    """The judge cannot be used (unreachable, refused, misconfigured), or an answers file does not fit;
    the message says what to do."""


# --- scores without a judge -----------------------------------------------------------------------

def words(text):
    """Lower-cased runs of letters and digits: the tokens Google's rouge-score compares."""
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge_l(candidate, reference):
    """ROUGE-L F1: the longest common subsequence of words, as precision and recall's harmonic mean."""
    a, b = words(candidate), words(reference)
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def bootstrap_ci(values, resamples=BOOTSTRAP_RESAMPLES, seed=0, confidence=CONFIDENCE):
    """(mean, low, high): the percentile bootstrap over items, with a fixed seed so it reproduces."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return None, None, None
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(values.mean()), float(low), float(high)


def win_rates(scores):
    """{a: {b: share of items where a scored above b, a tie counting half}} for scores {model: [per item]}."""
    return {a: {b: float(np.mean([1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(scores[a], scores[b])]))
                for b in scores if b != a}
            for a in scores}


# --- the prompt and the reply ---------------------------------------------------------------------

def model_order(item, k, seed=SEED):
    """Which model is shown as Model 1, 2, ... for this item: a permutation of range(k)."""
    return random.Random(f"{seed}:{item}").sample(range(k), k)


def judge_prompt(entry, answers):
    """One prompt with every model's answer to an item, in the order given (already shuffled)."""
    labels = [f"Model {i + 1}" for i in range(len(answers))]
    parts = [
        f"You are grading the answers of {len(answers)} language models to the same instruction. Score each "
        "answer from 0 to 100 for how well it completes the instruction: 100 is as good as the reference "
        "answer, 0 is wrong, empty or unrelated. The reference shows what a correct answer says; an answer "
        "worded differently can still score 100. The models are listed in a random order; judge each answer "
        "on its own merits.",
        f"### Instruction and input\n{instructions.format_prompt(entry)}",
        f"### Reference answer\n{entry['output']}",
    ]
    parts += [f"### {label}'s answer\n{text}" for label, text in zip(labels, answers)]
    example = ", ".join(f'"{label}": {{"score": <0-100>, "comments": "<one sentence>"}}' for label in labels)
    parts.append(f"Reply with JSON only, in this form: {{{example}}}")
    return "\n\n".join(parts)


class MalformedReply(ValueError):
    """A reply that is not the JSON the prompt asked for."""


def parse_reply(text, k):
    """[(score, comments)] for Model 1..k from the judge's reply (JSON, maybe inside a code fence)."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise MalformedReply(f"no JSON object in the reply: {text[:80]!r}")
    try:
        doc = json.loads(text[start:end + 1])
    except ValueError as e:
        raise MalformedReply(f"the reply's JSON does not parse ({e})") from None
    result = []
    for i in range(1, k + 1):
        entry = doc.get(f"Model {i}") if isinstance(doc, dict) else None
        score = entry.get("score") if isinstance(entry, dict) else None
        if isinstance(score, str):
            score = float(score) if re.fullmatch(r"\s*\d+(\.\d+)?\s*", score) else None
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 100:
            raise MalformedReply(f"the reply has no score from 0 to 100 for Model {i}")
        result.append((float(score), str(entry.get("comments", ""))))
    return result


# --- the judge ------------------------------------------------------------------------------------

class Judge:
    """An OpenAI-compatible chat completions endpoint, asked with retries, answers cached on disk."""

    def __init__(self, api_base, model, api_key=None, cache_path=CACHE, temperature=None, timeout=TIMEOUT,
                 retries=RETRIES, retry_wait=RETRY_WAIT):
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.temperature = model, api_key, temperature
        self.timeout, self.retries, self.retry_wait = timeout, retries, retry_wait
        self.cache_path = cache_path
        self.cache = self._read_cache()
        self.requests = self.cache_hits = 0

    def _read_cache(self):
        cache = {}
        if os.path.isfile(self.cache_path):
            with open(self.cache_path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                        cache[record["key"]] = record
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut short by a crash: that judgment is asked again
        return cache

    def key(self, prompt):
        return hashlib.sha256(json.dumps([self.model, self.temperature, prompt]).encode()).hexdigest()

    def scores(self, prompt, k, record):
        """[(score, comments)] for Model 1..k, from the cache or the endpoint; None if no reply parsed
        after ASKS_PER_ITEM asks. `record` (item, order, ...) is stored with the judgment."""
        key = self.key(prompt)
        if key in self.cache:
            self.cache_hits += 1
            return [tuple(x) for x in self.cache[key]["scores"]]
        for _ in range(ASKS_PER_ITEM):
            reply = self.complete(prompt)
            try:
                result = parse_reply(reply, k)
            except MalformedReply:
                continue
            self._remember({**record, "key": key, "judge": self.model, "scores": result, "reply": reply})
            return result
        return None

    def _remember(self, record):
        os.makedirs(os.path.dirname(os.path.abspath(self.cache_path)), exist_ok=True)
        with open(self.cache_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.cache[record["key"]] = record

    def complete(self, prompt):
        """The reply's text; network failures and HTTP 429/5xx retried with backoff, then a JudgeError."""
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}]}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        problem = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.retry_wait * 2 ** (attempt - 1))
            self.requests += 1
            request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace").strip()
                if e.code == 429 or e.code >= 500:
                    problem = f"HTTP {e.code}: {detail}"
                    continue
                hint = {401: "check OPENAI_API_KEY", 403: "check OPENAI_API_KEY",
                        404: "check --api-base (it ends in /v1) and --model"}.get(e.code, "check --model and --api-base")
                raise JudgeError(f"the judge at {self.url} refused the request (HTTP {e.code}: {detail}); {hint}") from None
            except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out, name not found
                problem = str(getattr(e, "reason", e))
                continue
            try:
                return json.loads(raw)["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError):
                return raw.decode("utf-8", "replace")  # not the protocol's JSON: parse_reply says so
        raise JudgeError(f"could not reach the judge at {self.url} after {self.retries + 1} tries ({problem}); "
                         "start the server or check --api-base")


def api_key_for(api_base):
    """OPENAI_API_KEY; required for OpenAI's own endpoint, sent to others when it is set."""
    key = os.environ.get("OPENAI_API_KEY")
    if not key and "api.openai.com" in api_base:
        raise JudgeError("OPENAI_API_KEY is not set: export your OpenAI API key, or pass --api-base with a local "
                         "OpenAI-compatible server (ollama: http://localhost:11434/v1)")
    return key


# --- answers files (evaluate.py instruct) ---------------------------------------------------------

ANSWER_KEYS = ("item", *instructions.FIELDS, "model_answer", "model")


def same_item(record, entry):
    return all(record.get(k) == entry[k] for k in instructions.FIELDS)


def read_answer_lines(path):
    """The records of an answers file; a last line cut short by a kill is dropped (from the file too)."""
    records, good_bytes = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("cut short")
                records.append(json.loads(line))
            except ValueError:
                break
            good_bytes += len(line)
    if good_bytes != os.path.getsize(path):
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return records


def read_answers(path):
    """The records of a finished answers file (evaluate.py instruct --out), item 0, 1, ... in order."""
    if not os.path.isfile(path):
        if os.path.isfile(path + ".partial"):
            raise JudgeError(f"{path} is unfinished ({path}.partial holds part of it): rerun evaluate.py "
                             "instruct with the same --out to finish it")
        raise JudgeError(f"{path} does not exist; write it with evaluate.py instruct --out {path}")
    try:
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    except ValueError:
        raise JudgeError(f"{path} is not JSONL; pass a file written by evaluate.py instruct") from None
    for i, record in enumerate(records):
        if not isinstance(record, dict) or any(k not in record for k in ANSWER_KEYS) or record["item"] != i:
            raise JudgeError(f"{path} line {i + 1} is not item {i} with {', '.join(ANSWER_KEYS)}; pass a "
                             "file written by evaluate.py instruct")
    if not records:
        raise JudgeError(f"{path} has no answers")
    return records


def resume_answers(partial, test, name):
    """Answers already in PATH.partial from an interrupted run, checked to be this model's, in order."""
    if not os.path.isfile(partial):
        return []
    done = read_answer_lines(partial)
    for i, record in enumerate(done):
        if record.get("item") != i or i >= len(test) or not same_item(record, test[i]) or record.get("model") != name:
            raise JudgeError(f"{partial} holds answers of another model or data (line {i + 1}); delete it "
                             "or pass another --out")
    return done


def write_answers(load_model, out, data, name, max_new_tokens, device):
    """A model's greedy answers to the test split of `data` (None: the book's), each with its reference
    answer's loss, written to the answers file `out` (resumed from OUT.partial). `load_model()` gives
    (model, where it came from): it is called only when answers are left to write, so a finished file
    loads no model, and judging never needs to know how models are stored."""
    examples, data_path, _ = instructions.load_examples(data)
    test = instructions.split_examples(examples, data_path)["test"]
    if os.path.exists(out):
        done = read_answers(out)
        if len(done) == len(test) and all(r["model"] == name and same_item(r, e) for r, e in zip(done, test)):
            print(f"{out} already holds {name}'s {len(test)} answers; nothing to do")
            return
        raise JudgeError(f"{out} already exists with other answers; pass another --out or delete it")
    partial = out + ".partial"
    done = resume_answers(partial, test, name)
    if done:
        print(f"resuming: {len(done)} of {len(test)} answers are already in {partial}")
    model, where = load_model()
    tokenizer = gpt.get_tokenizer()
    max_length = model.cfg["context_length"]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    records = list(done)
    with open(partial, "a", encoding="utf-8") as f:
        for i in tqdm(range(len(done), len(test)), initial=len(done), total=len(test), desc=f"answers {name}",
                      unit="item"):
            entry = test[i]
            loss, tokens = instructions.reference_loss(model, entry, tokenizer, max_length, device)
            record = {"item": i, **entry, "model_answer": instructions.answer(model, entry, tokenizer, device,
                                                                             max_new_tokens),
                      "model": name, "reference_loss": loss, "reference_tokens": tokens, "checkpoint": where}
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a kill loses at most the item being written
            records.append(record)
    os.replace(partial, out)
    rouge = sum(rouge_l(r["model_answer"], r["output"]) for r in records) / len(records)
    losses = [r["reference_loss"] for r in records if r["reference_loss"] is not None]
    print(f"wrote {len(records)} answers of {name} to {out}: mean ROUGE-L {rouge:.3f}"
          + (f", reference-answer loss {sum(losses) / len(losses):.4f}" if losses else "")
          + f"; score them with: evaluate.py judge {out} ...")


# --- scoring answers files (evaluate.py judge) ----------------------------------------------------

def answer_sets(paths):
    """(model names, records per file): the files must answer the same items; a name used twice gets its file's."""
    sets = [read_answers(p) for p in paths]
    for path, records in zip(paths[1:], sets[1:]):
        if len(records) != len(sets[0]) or not all(same_item(r, e) for r, e in zip(records, sets[0])):
            raise JudgeError(f"{path} and {paths[0]} answer different items; write both with evaluate.py "
                             "instruct on the same --data")
    names = [records[0]["model"] for records in sets]
    if len(set(names)) < len(names):
        names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if len(set(names)) < len(names):
        raise JudgeError("two answers files have the same model name and file name; rename one")
    return names, sets


def judge_items(judge_client, names, sets, seed):
    """Per item: {"item", "order", "scores": {name: score}, "comments"}; None for an item the judge
    never answered with the JSON asked for."""
    results = []
    for i in tqdm(range(len(sets[0])), desc=f"judge {judge_client.model}", unit="item"):
        order = model_order(i, len(names), seed)
        prompt = judge_prompt(sets[0][i], [sets[m][i]["model_answer"] for m in order])
        labels = [names[m] for m in order]
        scored = judge_client.scores(prompt, len(names), {"item": i, "order": labels})
        results.append(None if scored is None else {
            "item": i, "order": labels, "scores": {n: s for n, (s, _) in zip(labels, scored)},
            "comments": {n: c for n, (_, c) in zip(labels, scored)}})
    return results


def judge_summary(names, sets, judged, seed):
    """Per model: the judge's mean score with its 95% CI over the judged items, ROUGE-L likewise over
    all items, the mean reference-answer loss, and the win rate against each other model."""
    kept = [r for r in judged if r is not None] if judged is not None else []
    scores = {n: [r["scores"][n] for r in kept] for n in names}
    wins = win_rates(scores) if kept else {}
    summary = {}
    for name, records in zip(names, sets):
        mean, low, high = bootstrap_ci(scores[name], seed=seed)
        rouge = [rouge_l(r["model_answer"], r["output"]) for r in records]
        r_mean, r_low, r_high = bootstrap_ci(rouge, seed=seed)
        losses = [r["reference_loss"] for r in records if r.get("reference_loss") is not None]
        summary[name] = {"mean": mean, "ci_low": low, "ci_high": high, "n": len(kept),
                         "rouge_l": r_mean, "rouge_l_ci_low": r_low, "rouge_l_ci_high": r_high, "items": len(records),
                         "reference_loss": sum(losses) / len(losses) if losses else None,
                         "win_rate": wins.get(name, {})}
    return summary


def format_judge_table(summary, with_judge):
    header = ["model", "items"] + (["judge score (95% CI)"] if with_judge else []) + \
             ["ROUGE-L (95% CI)", "reference-answer loss"]
    rows = []
    for name, s in summary.items():
        cells = [name, str(s["items"])]
        if with_judge:
            cells.append(f"{s['mean']:.2f} ({s['ci_low']:.2f} to {s['ci_high']:.2f})" if s["n"] else "-")
        cells.append(f"{s['rouge_l']:.3f} ({s['rouge_l_ci_low']:.3f} to {s['rouge_l_ci_high']:.3f})")
        cells.append(f"{s['reference_loss']:.4f}" if s["reference_loss"] is not None else "-")
        rows.append(cells)
    return cli.render_table(header, rows)


def score_answers(paths, model, api_base, cache, temperature, timeout, retries, retry_wait, seed, out, as_json):
    """Score answers files (one per model, the same items): by the judge `model` at `api_base` when one
    is named, and by ROUGE-L and the reference-answer loss always. Prints the table (or, with
    `as_json`, the summary per model) and writes each item's judgment to `out` when given."""
    names, sets = answer_sets(paths)  # read first: a bad file ends the run before any judge is asked
    judged = None
    if model:
        client = Judge(api_base, model, api_key_for(api_base), cache, temperature, timeout, retries, retry_wait)
        judged = judge_items(client, names, sets, seed)
    summary = judge_summary(names, sets, judged, seed)
    unjudged = [i for i, r in enumerate(judged or []) if r is None]
    if out:
        files.write_jsonl_atomic(out, [
            {**(r or {"item": i, "order": None, "scores": None, "comments": None}), "instruction": sets[0][i]["instruction"],
             "rouge_l": {n: rouge_l(s[i]["model_answer"], s[i]["output"]) for n, s in zip(names, sets)}}
            for i, r in enumerate(judged or [None] * len(sets[0]))])
    if as_json:
        print(json.dumps(summary))
    else:
        print(format_judge_table(summary, judged is not None))
        if judged is not None and len(names) > 1 and summary[names[0]]["n"]:
            print("\nwin rate, row over column (a tie counts half):")
            width = max(len(n) for n in names)
            print(" " * width + "  " + "  ".join(n.rjust(max(len(n), 5)) for n in names))
            for a in names:
                print(a.ljust(width) + "  " + "  ".join(
                    ("-" if a == b else f"{summary[a]['win_rate'][b]:.2f}").rjust(max(len(b), 5)) for b in names))
        if judged is not None:
            print(f"\njudge: {model} at {client.url}; {len(judged)} items, {client.requests} requests sent, "
                  f"{client.cache_hits} judgments from {cache}; model order seed {seed}")
        else:
            print("\nno judge: pass --model NAME (and --api-base URL for a local server) to add the judge's scores")
        print("Giles Thomas's scores (one answer per prompt, so compare rankings rather than numbers): judged by "
              "GPT-5.1: " + ", ".join(f"{k} {v:.2f}" for k, v in reference.JUDGED_BY_GPT_5_1.items()) +
              "; by Llama 3: " + ", ".join(f"{k} {v:.2f}" for k, v in reference.JUDGED_BY_LLAMA_3.items()))
    if unjudged:
        print(f"warning: {len(unjudged)} item(s) got no usable judgment after {ASKS_PER_ITEM} asks each "
              f"(items {', '.join(map(str, unjudged))}) and are left out of the judge's means (n = "
              f"{len(sets[0]) - len(unjudged)}); rerun to ask again", file=sys.stderr)

"""Instruction-following answers and their scores, the post's second yardstick (docs/judge.md says how
and why): `evaluate.py instruct` writes a model's answers (write_answers), `evaluate.py judge` scores
them (score_answers) by an LLM judge that sees every model's answer to an item in one prompt, and by
ROUGE-L and the reference-answer loss, which need no judge."""

import email.utils
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
RETRIES = 5                     # after a network failure or HTTP 429/5xx
RETRY_WAIT = 2.0                # seconds before the first retry, doubling after each, plus 0-50% jitter
MAX_RETRY_AFTER = 600.0         # seconds: a server's Retry-After is honoured up to this
ASKS_PER_ITEM = 3               # a reply that is not the JSON asked for is asked again, up to this many times
CACHE = os.path.join("out", "judge_cache.jsonl")
SEED = 123
BOOTSTRAP_RESAMPLES = 10_000
CONFIDENCE = 0.95


class JudgeError(Exception):
    """The judge cannot be used, or an answers file does not fit; the message says what to do."""


# --- scores without a judge -----------------------------------------------------------------------

def rouge_l(candidate, reference):
    """ROUGE-L F1: the longest common subsequence of words, as precision and recall's harmonic mean.
    Words are lower-cased runs of letters and digits, the tokens Google's rouge-score compares."""
    a, b = (re.findall(r"[a-z0-9]+", text.lower()) for text in (candidate, reference))
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    return 2 * lcs / (len(a) + len(b)) if lcs else 0.0  # 2PR / (P + R) with P = lcs/|a|, R = lcs/|b|


def bootstrap_ci(values, resamples=BOOTSTRAP_RESAMPLES, seed=0, confidence=CONFIDENCE):
    """(mean, low, high): the percentile bootstrap over items, with a fixed seed so it reproduces."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return None, None, None
    resampled = np.random.default_rng(seed).integers(0, len(values), (resamples, len(values)))
    means = values[resampled].mean(axis=1)
    low, high = np.percentile(means, [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(values.mean()), float(low), float(high)


def win_rates(scores):
    """{a: {b: share of items where a scored above b, a tie counting half}} for scores {model: [per item]}."""
    return {a: {b: float(np.mean((np.sign(np.subtract(scores[a], scores[b])) + 1) / 2))  # 1, 0.5 or 0 per item
                for b in scores if b != a}
            for a in scores}


# --- the prompt and the reply ---------------------------------------------------------------------

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
    try:
        doc = json.loads(text[text.find("{"):text.rfind("}") + 1])
    except ValueError:
        raise MalformedReply(f"no JSON object in the reply: {text[:80]!r}") from None
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

def retry_delay(attempt, retry_wait, retry_after, rng):
    """Seconds before retry `attempt` (1, 2, ...): what a Retry-After header asks (seconds or an HTTP
    date; at most MAX_RETRY_AFTER), else retry_wait x 2^(attempt - 1) stretched by a random 0-50%, so
    that clients refused together do not all come back at the same moment."""
    try:
        seconds = int(retry_after) if retry_after.strip().isdecimal() else \
            email.utils.parsedate_to_datetime(retry_after).timestamp() - time.time()
    except (TypeError, ValueError):  # no header (""), or one that does not parse
        return retry_wait * 2 ** (attempt - 1) * (1 + rng.random() / 2)
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


class Judge:
    """An OpenAI-compatible chat completions endpoint, asked with retries, answers cached on disk."""

    def __init__(self, api_base, model, api_key, cache_path, temperature, timeout, retries, retry_wait):
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.model, self.temperature, self.cache_path = model, temperature, cache_path
        self.timeout, self.retries, self.retry_wait = timeout, retries, retry_wait
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.rng = random.Random()  # unseeded: the jitter must differ between clients
        self.json_mode = True  # asks for response_format json_object until the endpoint refuses it
        self.requests = self.cache_hits = 0
        self.cache = {}
        if os.path.isfile(cache_path):
            with open(cache_path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                        self.cache[record["key"]] = record
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut short by a crash: that judgment is asked again

    def scores(self, prompt, k, record):
        """[(score, comments)] for Model 1..k, from the cache or the endpoint; None if no reply parsed
        after ASKS_PER_ITEM asks. `record` (item, order) is stored with the judgment."""
        key = hashlib.sha256(json.dumps([self.model, self.temperature, prompt]).encode()).hexdigest()
        if key in self.cache:
            self.cache_hits += 1
            return [tuple(x) for x in self.cache[key]["scores"]]
        for _ in range(ASKS_PER_ITEM):
            reply = self.complete(prompt)
            try:
                result = parse_reply(reply, k)
            except MalformedReply:
                continue
            self.cache[key] = {**record, "key": key, "judge": self.model, "scores": result, "reply": reply}
            os.makedirs(os.path.dirname(os.path.abspath(self.cache_path)), exist_ok=True)
            with open(self.cache_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(self.cache[key]) + "\n")
                f.flush()
                os.fsync(f.fileno())
            return result
        return None

    def complete(self, prompt):
        """The reply's text. Network failures and HTTP 429/5xx are retried (retry_delay), then a
        JudgeError; an endpoint that refuses response_format is asked without it from then on."""
        problem, attempt = None, 0
        while attempt <= self.retries:
            body = {"model": self.model, "messages": [{"role": "user", "content": prompt}]}
            if self.temperature is not None:
                body["temperature"] = self.temperature
            if self.json_mode:
                body["response_format"] = {"type": "json_object"}
            self.requests += 1
            request = urllib.request.Request(self.url, json.dumps(body).encode(), self.headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                try:
                    return json.loads(raw)["choices"][0]["message"]["content"] or ""
                except (ValueError, KeyError, IndexError, TypeError):
                    return raw.decode("utf-8", "replace")  # not the protocol's JSON: parse_reply says so
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace").strip()
                if (e.code in (400, 422) and self.json_mode
                        and re.search(r"response_format|json_object|unsupported", detail, re.IGNORECASE)):
                    self.json_mode = False  # no JSON mode here: plain replies parse all the same
                    continue
                if e.code != 429 and e.code < 500:
                    hint = ("check OPENAI_API_KEY" if e.code in (401, 403) else "check --model and --api-base"
                            if e.code != 404 else "check --api-base (it ends in /v1) and --model")
                    raise JudgeError(f"the judge at {self.url} refused the request (HTTP {e.code}: {detail}); "
                                     f"{hint}") from None
                problem, retry_after = f"HTTP {e.code}: {detail}", e.headers.get("Retry-After", "")
            except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out, name not found
                problem, retry_after = str(getattr(e, "reason", e)), ""
            attempt += 1
            if attempt <= self.retries:
                time.sleep(retry_delay(attempt, self.retry_wait, retry_after, self.rng))
        raise JudgeError(f"could not reach the judge at {self.url} after {self.retries + 1} tries ({problem}); "
                         "start the server or check --api-base")


# --- answers files (evaluate.py instruct) ---------------------------------------------------------

ANSWER_KEYS = ("item", *instructions.FIELDS, "model_answer", "model")


def same_item(record, entry):
    return isinstance(record, dict) and all(record.get(k) == entry[k] for k in instructions.FIELDS)


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
    """The answers in PATH.partial from an interrupted run, checked to be this model's, in order; a last
    line cut short by a kill is dropped, from the file too."""
    if not os.path.isfile(partial):
        return []
    with open(partial, "rb") as f:
        lines = f.read().split(b"\n")[:-1]  # what follows the last newline was cut short
    done = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            break
        if (i >= len(test) or not same_item(record, test[i])
                or (record.get("item"), record.get("model")) != (i, name)):
            raise JudgeError(f"{partial} holds answers of another model or data (line {i + 1}); delete it "
                             "or pass another --out")
        done.append(record)
    os.truncate(partial, sum(len(line) + 1 for line in lines[:len(done)]))
    return done


def write_answers(load_model, out, data, name, max_new_tokens, device):
    """A model's greedy answers to the test split of `data` (None: the book's), each with its reference
    answer's loss, written to the answers file `out` (resumed from OUT.partial). `load_model()` gives
    (model, where it came from); it is called only when answers are left to write."""
    examples, data_path, _ = instructions.load_examples(data)
    test = instructions.split_examples(examples, data_path)["test"]
    if os.path.exists(out):
        done = read_answers(out)
        if len(done) == len(test) and all(r["model"] == name and same_item(r, e) for r, e in zip(done, test)):
            print(f"{out} already holds {name}'s {len(test)} answers; nothing to do")
            return
        raise JudgeError(f"{out} already exists with other answers; pass another --out or delete it")
    partial = out + ".partial"
    records = resume_answers(partial, test, name)
    if records:
        print(f"resuming: {len(records)} of {len(test)} answers are already in {partial}")
    model, where = load_model()
    tokenizer, max_length = gpt.get_tokenizer(), model.cfg["context_length"]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(partial, "a", encoding="utf-8") as f:
        for i in tqdm(range(len(records), len(test)), initial=len(records), total=len(test),
                      desc=f"answers {name}", unit="item"):
            entry = test[i]
            loss, tokens = instructions.reference_loss(model, entry, tokenizer, max_length, device)
            answer = instructions.answer(model, entry, tokenizer, device, max_new_tokens)
            records.append({"item": i, **entry, "model_answer": answer, "model": name, "reference_loss": loss,
                            "reference_tokens": tokens, "checkpoint": where})
            f.write(json.dumps(records[-1]) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a kill loses at most the item being written
    os.replace(partial, out)
    rouge = sum(rouge_l(r["model_answer"], r["output"]) for r in records) / len(records)
    losses = [r["reference_loss"] for r in records if r["reference_loss"] is not None]
    print(f"wrote {len(records)} answers of {name} to {out}: mean ROUGE-L {rouge:.3f}"
          + (f", reference-answer loss {sum(losses) / len(losses):.4f}" if losses else "")
          + f"; score them with: evaluate.py judge {out} ...")


# --- scoring answers files (evaluate.py judge) ----------------------------------------------------

def answer_sets(paths):
    """(model names, records per file) of files that answer the same items; a name used twice: the files'."""
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
        order = random.Random(f"{seed}:{i}").sample(range(len(names)), len(names))  # who is Model 1, 2, ...
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
    kept = [r for r in judged or [] if r is not None]
    scores = {n: [r["scores"][n] for r in kept] for n in names}
    wins = win_rates(scores) if kept else {}
    summary = {}
    for name, records in zip(names, sets):
        mean, low, high = bootstrap_ci(scores[name], seed=seed)
        rouge = [rouge_l(r["model_answer"], r["output"]) for r in records]
        r_mean, r_low, r_high = bootstrap_ci(rouge, seed=seed)
        losses = [r["reference_loss"] for r in records if r.get("reference_loss") is not None]
        summary[name] = {"mean": mean, "ci_low": low, "ci_high": high, "n": len(kept),
                         "rouge_l": r_mean, "rouge_l_ci_low": r_low, "rouge_l_ci_high": r_high,
                         "items": len(records),
                         "reference_loss": sum(losses) / len(losses) if losses else None,
                         "win_rate": wins.get(name, {})}
    return summary


def format_judge_table(summary, with_judge):
    rows = [["model", "items", "judge score (95% CI)", "ROUGE-L (95% CI)", "reference-answer loss"]]
    for name, s in summary.items():
        rows.append([name, str(s["items"]),
                     f"{s['mean']:.2f} ({s['ci_low']:.2f} to {s['ci_high']:.2f})" if s["n"] else "-",
                     f"{s['rouge_l']:.3f} ({s['rouge_l_ci_low']:.3f} to {s['rouge_l_ci_high']:.3f})",
                     f"{s['reference_loss']:.4f}" if s["reference_loss"] is not None else "-"])
    rows = [row if with_judge else row[:2] + row[3:] for row in rows]  # no judge: no judge column
    return cli.render_table(rows[0], rows[1:])


def score_answers(paths, model, api_base, cache, temperature, timeout, retries, retry_wait, seed, out, as_json):
    """Score answers files (one per model, the same items): by the judge `model` at `api_base` when one
    is named, and by ROUGE-L and the reference-answer loss always. Prints the table (or, with
    `as_json`, the summary per model) and writes each item's judgment to `out` when given."""
    names, sets = answer_sets(paths)  # read first: a bad file ends the run before any judge is asked
    judged = None
    if model:
        api_key = os.environ.get("OPENAI_API_KEY")  # OpenAI's own endpoint needs it; others get it when set
        if not api_key and "api.openai.com" in api_base:
            raise JudgeError("OPENAI_API_KEY is not set: export your OpenAI API key, or pass --api-base with "
                             "a local OpenAI-compatible server (ollama: http://localhost:11434/v1)")
        client = Judge(api_base, model, api_key, cache, temperature, timeout, retries, retry_wait)
        judged = judge_items(client, names, sets, seed)
    summary = judge_summary(names, sets, judged, seed)
    unjudged = [i for i, r in enumerate(judged or []) if r is None]
    if out:
        files.write_jsonl_atomic(out, [
            {**(r or {"item": i, "order": None, "scores": None, "comments": None}),
             "instruction": sets[0][i]["instruction"],
             "rouge_l": {n: rouge_l(s[i]["model_answer"], s[i]["output"]) for n, s in zip(names, sets)}}
            for i, r in enumerate(judged or [None] * len(sets[0]))])
    if as_json:
        print(json.dumps(summary))
    else:
        print(format_judge_table(summary, judged is not None))
        if judged is not None and len(names) > 1 and summary[names[0]]["n"]:
            print("\nwin rate, row over column (a tie counts half):")
            print(cli.render_table(["", *names], [[a] + ["-" if a == b else f"{summary[a]['win_rate'][b]:.2f}"
                                                         for b in names] for a in names]))
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

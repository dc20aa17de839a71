"""Scoring instruction-following answers: an LLM judge, and scores that need no LLM.

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
"""

import hashlib
import json
import os
import random
import re
import time
import urllib.error
import urllib.request

import numpy as np

import instructions

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
    """The judge cannot be used (unreachable, refused, misconfigured); the message says what to do."""


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
        self.requests = self.cache_hits = self.malformed_replies = 0

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
                self.malformed_replies += 1
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

"""evaluate.py judge and judge.py: the LLM judge's HTTP path against a small OpenAI-protocol server this
file starts on 127.0.0.1 (standing in for OpenAI or a local ollama), and the judge-free scores
against Google's rouge-score package and hand computations."""

import email.utils
import http.server
import itertools
import json
import os
import random
import re
import threading
import time

import numpy as np
import pytest

import evaluate
import judge

N_ITEMS = 6


# --- scores without a judge -----------------------------------------------------------------------

def test_rouge_l_equals_googles_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pairs = [("The car is as fast as a cheetah.", "The car is as fast as lightning."),
             ("A thunder storm is a type of thunder.", "The type of cloud typically associated with thunderstorms is cumulonimbus."),
             ("The author of 'Pride and Prejudice' is Robert Frost.", "Jane Austen."),
             ("jane AUSTEN!!", "Jane Austen."), ("", "Jane Austen."), ("42 is 6*7", "6 * 7 = 42")]
    for candidate, reference in pairs:
        assert judge.rouge_l(candidate, reference) == pytest.approx(scorer.score(reference, candidate)["rougeL"].fmeasure)


def exact_bootstrap_quantiles(values, q_low, q_high):
    """Every one of the n^n equally likely resamples, enumerated: the exact bootstrap distribution."""
    means = sorted(np.mean(r) for r in itertools.product(values, repeat=len(values)))
    cdf = np.arange(1, len(means) + 1) / len(means)
    return means[np.searchsorted(cdf, q_low)], means[np.searchsorted(cdf, q_high)], means, cdf


def test_bootstrap_interval_equals_the_exact_bootstrap_distribution():
    values = [0, 30, 30, 30, 100, 100]
    low, high, means, cdf = exact_bootstrap_quantiles(values, 0.025, 0.975)
    # both quantiles sit well inside a step of the exact distribution, so sampling cannot move them
    for q, x in ((0.025, low), (0.975, high)):
        below = cdf[np.searchsorted(means, x, side="left") - 1]
        at = cdf[np.searchsorted(means, x, side="right") - 1]
        assert below < q - 0.005 and at > q + 0.005
    mean, ci_low, ci_high = judge.bootstrap_ci(values, resamples=100_000)
    assert mean == pytest.approx(sum(values) / 6)
    assert (ci_low, ci_high) == pytest.approx((low, high), abs=1e-9)


def test_win_rates_count_ties_as_half():
    rates = judge.win_rates({"a": [10, 50, 50, 90], "b": [20, 50, 40, 10]})
    assert rates == {"a": {"b": (0 + 0.5 + 1 + 1) / 4}, "b": {"a": (1 + 0.5 + 0 + 0) / 4}}


@pytest.mark.parametrize("reply, expected", [
    ('{"Model 1": {"score": 70, "comments": "fine"}, "Model 2": {"score": 5.5}}', [70.0, 5.5]),
    ('Sure!\n```json\n{"Model 1": {"score": "70"}, "Model 2": {"score": 0}}\n```', [70.0, 0.0]),
    ('{"Model 1": {"score": 101}, "Model 2": {"score": 5}}', None),
    ('{"Model 1": {"score": 70}}', None),
    ('{"Model 1": {"score": true}, "Model 2": {"score": 5}}', None),
    ("Model 1 is better.", None),
])
def test_a_reply_is_parsed_only_when_it_is_the_json_asked_for(reply, expected):
    if expected is not None:
        assert [score for score, _ in judge.parse_reply(reply, 2)] == expected
    else:
        with pytest.raises(judge.MalformedReply):
            judge.parse_reply(reply, 2)


# --- the judge over HTTP --------------------------------------------------------------------------

def answers_files(tmp_path):
    """Two models' answers to the same items; each answer carries the score the stand-in judge gives it."""
    rng = np.random.default_rng(1)
    scores = {"alpha": [int(x) for x in rng.integers(0, 101, N_ITEMS)], "beta": [int(x) for x in rng.integers(0, 101, N_ITEMS)]}
    paths = []
    for model in ("alpha", "beta"):
        path = tmp_path / f"{model}.jsonl"
        with open(path, "w") as f:
            for i in range(N_ITEMS):
                f.write(json.dumps({"item": i, "instruction": f"Instruction number {i}.", "input": "" if i % 2 else "some input",
                                    "output": f"reference {i}", "model_answer": f"{model} answer {i} (worth {scores[model][i]})",
                                    "model": model, "reference_loss": 1.0 + i / 10}) + "\n")
        paths.append(str(path))
    return paths, scores


class StandIn(http.server.ThreadingHTTPServer):
    """An OpenAI-style /v1/chat/completions that scores each answer by the '(worth N)' in it. Items whose
    instruction names them in `malformed_once` get one reply that is not JSON first; in `always_malformed`,
    never anything else. The first `fail_first` requests get HTTP `fail_status`, every request gets `status`
    if given; both with a Retry-After header when `retry_after()` gives one. `no_json_mode` refuses a
    request with response_format as OpenAI refuses it for a model without JSON mode."""

    def __init__(self, malformed_once=(), always_malformed=(), fail_first=0, status=None, fail_status=500,
                 retry_after=lambda: None, no_json_mode=False):
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests, self.malformed_once, self.always_malformed = [], set(malformed_once), set(always_malformed)
        self.fail_first, self.status, self.fail_status = fail_first, status, fail_status
        self.retry_after, self.no_json_mode = retry_after, no_json_mode
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def __exit__(self, *exc):
        self.shutdown()
        super().__exit__(*exc)


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization"),
                                "time": time.time()})
        if server.no_json_mode and "response_format" in body:
            return self.reply(400, {"error": {"message": "Invalid parameter: 'response_format' of type 'json_object' "
                                              "is not supported with this model.", "param": "response_format"}})
        if server.status or len(server.requests) <= server.fail_first:
            return self.reply(server.status or server.fail_status, {"error": {"message": "stand-in failure"}},
                              server.retry_after())
        prompt = body["messages"][0]["content"]
        item = int(re.search(r"Instruction number (\d+)\.", prompt).group(1))
        if item in server.always_malformed or item in server.malformed_once:
            server.malformed_once.discard(item)
            return self.reply(200, {"choices": [{"message": {"role": "assistant", "content": "Model 1 wins."}}]})
        answers = re.findall(r"### (Model \d+)'s answer\n.*?\(worth (\d+)\)", prompt)
        content = json.dumps({label: {"score": int(worth), "comments": "as marked"} for label, worth in answers})
        self.reply(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})

    def reply(self, status, doc, retry_after=None):
        data = json.dumps(doc).encode()
        self.send_response(status)
        if retry_after is not None:
            self.send_header("Retry-After", retry_after)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def run_judge(paths, server, tmp_path, capsys, *extra):
    evaluate.main(["judge", *paths, "--api-base", server.url, "--model", "stand-in", "--cache",
                   str(tmp_path / "cache.jsonl"), "--out", str(tmp_path / "judgments.jsonl"), "--retry-wait", "0",
                   "--json", *extra])
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_every_answer_goes_in_one_shuffled_prompt_and_scores_map_back(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    paths, scores = answers_files(tmp_path)
    with StandIn() as server:
        summary, _ = run_judge(paths, server, tmp_path, capsys)
    assert len(server.requests) == N_ITEMS
    assert all(r["path"] == "/v1/chat/completions" and r["body"]["model"] == "stand-in" and r["auth"] == "Bearer sk-test"
               and r["body"]["response_format"] == {"type": "json_object"} for r in server.requests)
    judgments = [json.loads(line) for line in open(tmp_path / "judgments.jsonl")]
    for request, judged in zip(server.requests, judgments):
        prompt = request["body"]["messages"][0]["content"]
        shown = re.findall(r"### Model \d+'s answer\n(\w+) answer", prompt)
        assert shown == judged["order"] and sorted(shown) == ["alpha", "beta"]  # both answers, in the order recorded
        assert f"reference {judged['item']}" in prompt
        assert judged["scores"] == {m: scores[m][judged["item"]] for m in ("alpha", "beta")}
    assert len({tuple(j["order"]) for j in judgments}) == 2  # the order really is shuffled
    for model in ("alpha", "beta"):
        mean, low, high = judge.bootstrap_ci(scores[model], seed=judge.SEED)
        assert summary[model]["mean"] == pytest.approx(sum(scores[model]) / N_ITEMS)
        assert (summary[model]["ci_low"], summary[model]["ci_high"], summary[model]["n"]) == (low, high, N_ITEMS)
        assert summary[model]["reference_loss"] == pytest.approx(1.25)
    wins = sum((a > b) + 0.5 * (a == b) for a, b in zip(scores["alpha"], scores["beta"])) / N_ITEMS
    assert summary["alpha"]["win_rate"]["beta"] == pytest.approx(wins)


def test_a_malformed_reply_is_asked_again_and_one_never_answered_is_reported(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a local server needs no key
    paths, scores = answers_files(tmp_path)
    with StandIn(malformed_once={1}, always_malformed={4}, fail_first=1) as server:
        summary, err = run_judge(paths, server, tmp_path, capsys)
    # 6 items + one HTTP 500 retried + one second ask for item 1 + two more asks for item 4
    assert len(server.requests) == N_ITEMS + 1 + 1 + 2
    assert "1 item(s) got no usable judgment" in err and "items 4" in err
    judged = [i for i in range(N_ITEMS) if i != 4]
    for model in ("alpha", "beta"):
        assert summary[model]["n"] == N_ITEMS - 1
        assert summary[model]["mean"] == pytest.approx(np.mean([scores[model][i] for i in judged]))

    # The cache: a second run asks only what was never answered (item 4, three times), nothing else.
    with StandIn(always_malformed={4}) as server:
        again, _ = run_judge(paths, server, tmp_path, capsys)
    assert len(server.requests) == 3 and again == summary
    # A cache line cut short by a crash costs only its own judgment.
    lines = open(tmp_path / "cache.jsonl").read().splitlines()
    open(tmp_path / "cache.jsonl", "w").write("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
    with StandIn() as server:
        complete, _ = run_judge(paths, server, tmp_path, capsys)
    assert len(server.requests) == 2 and complete["alpha"]["n"] == N_ITEMS


@pytest.mark.slow
@pytest.mark.parametrize("status, retry_after", [
    (429, lambda: "1"),
    (503, lambda: email.utils.formatdate(time.time() + 2, usegmt=True)),  # an HTTP date, in whole seconds
])
def test_a_busy_endpoint_is_asked_again_no_sooner_than_its_retry_after(tmp_path, capsys, status, retry_after):
    paths, scores = answers_files(tmp_path)
    with StandIn(fail_first=1, fail_status=status, retry_after=retry_after) as server:
        summary, _ = run_judge(paths, server, tmp_path, capsys)  # --retry-wait 0: only the header waits
    assert len(server.requests) == N_ITEMS + 1 and summary["alpha"]["n"] == N_ITEMS
    assert server.requests[1]["time"] - server.requests[0]["time"] >= 0.95  # 1 s, less the clocks' resolution


def test_retry_waits_double_with_bounded_jitter_and_follow_retry_after():
    def waits(seed):
        rng = random.Random(seed)
        return [judge.retry_delay(attempt, 2.0, "", rng) for attempt in (1, 2, 3, 4, 5)]
    assert waits(0) == waits(0) and waits(0) != waits(1)  # seeded: reproducible, and a new seed, new waits
    for seed in (0, 1):
        stretch = [wait / (2.0 * 2 ** attempt) for attempt, wait in enumerate(waits(seed))]
        assert all(1 <= x <= 1.5 for x in stretch)  # 2 s, doubling after each retry, plus 0-50%
        assert len(set(stretch)) == 5  # the jitter differs from one retry to the next
    rng = random.Random(2)
    stretch = [judge.retry_delay(1, 1.0, "", rng) - 1 for _ in range(2000)]
    assert min(stretch) < 0.01 and max(stretch) > 0.49 and 0.23 < np.mean(stretch) < 0.27  # uniform on [0, 0.5)
    rng = random.Random(0)
    assert judge.retry_delay(3, 2.0, "7", rng) == 7 and judge.retry_delay(1, 2.0, " 0 ", rng) == 0
    assert 28 < judge.retry_delay(1, 2.0, email.utils.formatdate(time.time() + 30, usegmt=True), rng) <= 30
    assert judge.retry_delay(1, 2.0, "Wed, 21 Oct 2015 07:28:00 GMT", rng) == 0  # a date past: at once
    assert judge.retry_delay(1, 2.0, "86400", rng) == judge.MAX_RETRY_AFTER
    for unreadable in ("soon", "-5", "1.5e9"):
        assert 2.0 <= judge.retry_delay(1, 2.0, unreadable, rng) <= 3.0  # the backoff


def test_an_endpoint_without_json_mode_is_asked_without_it_once_it_refuses(tmp_path, capsys):
    paths, scores = answers_files(tmp_path)
    with StandIn(no_json_mode=True) as server:
        summary, _ = run_judge(paths, server, tmp_path, capsys)
    # one refused request, then every item asked once without response_format
    assert len(server.requests) == N_ITEMS + 1 and "response_format" in server.requests[0]["body"]
    assert not any("response_format" in r["body"] for r in server.requests[1:])
    for model in ("alpha", "beta"):
        assert summary[model]["n"] == N_ITEMS and summary[model]["mean"] == pytest.approx(np.mean(scores[model]))


def test_without_a_judge_the_offline_scores_still_make_a_table(tmp_path, capsys):
    paths, _ = answers_files(tmp_path)
    evaluate.main(["judge", *paths])
    out = capsys.readouterr().out
    assert "ROUGE-L" in out and "reference-answer loss" in out and "judge score" not in out
    assert "GPT-5.1: OpenAI GPT-2 small 20.39" in out  # his published numbers, under the table


@pytest.mark.parametrize("case", ["unreachable", "busy", "no key", "refused", "bad request", "not the same items",
                                  "unfinished"])
def test_bad_input_ends_in_one_line_and_leaves_no_results(tmp_path, capsys, monkeypatch, case):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    paths, _ = answers_files(tmp_path)
    args = ["judge", *paths, "--model", "m", "--out", str(tmp_path / "judgments.jsonl"), "--cache",
            str(tmp_path / "cache.jsonl"), "--retries", "1", "--retry-wait", "0"]
    server = StandIn(status={"busy": 429, "bad request": 400}.get(case, 401), retry_after=lambda: "0")
    try:
        if case == "unreachable":
            args += ["--api-base", "http://127.0.0.1:9/v1"]
            message = "could not reach the judge at http://127.0.0.1:9/v1/chat/completions after 2 tries"
        elif case == "busy":
            args += ["--api-base", server.url]
            message = "after 2 tries (HTTP 429: "
        elif case == "no key":
            message = "OPENAI_API_KEY is not set"
        elif case in ("refused", "bad request"):  # a 400 that does not name response_format is not retried
            args += ["--api-base", server.url]
            message = f"refused the request (HTTP {server.status}"
        elif case == "not the same items":
            lines = open(paths[1]).read().splitlines()
            open(paths[1], "w").write("\n".join(lines[:-1]) + "\n")
            message = "answer different items"
        else:
            os.rename(paths[1], paths[1] + ".partial")
            message = "is unfinished"
        with pytest.raises(SystemExit) as e:
            evaluate.main(args)
    finally:
        server.shutdown()
        server.server_close()
    assert e.value.code.startswith("error: ") and message in e.value.code and "\n" not in e.value.code
    assert len(server.requests) == {"busy": 2, "refused": 1, "bad request": 1}.get(case, 0)  # a refusal is final
    assert not (tmp_path / "judgments.jsonl").exists()

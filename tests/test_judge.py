"""evaluate.py judge and judge.py: the LLM judge's HTTP path against a small OpenAI-protocol server this
file starts on 127.0.0.1 (standing in for OpenAI or a local ollama), and the judge-free scores
against Google's rouge-score package and hand computations."""

import http.server
import itertools
import json
import os
import re
import threading

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
    never anything else; `fail_first` requests get HTTP 500."""

    def __init__(self, malformed_once=(), always_malformed=(), fail_first=0, status=None):
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests, self.malformed_once, self.always_malformed = [], set(malformed_once), set(always_malformed)
        self.fail_first, self.status = fail_first, status
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
        server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        if server.status or len(server.requests) <= server.fail_first:
            return self.reply(server.status or 500, {"error": {"message": "stand-in failure"}})
        prompt = body["messages"][0]["content"]
        item = int(re.search(r"Instruction number (\d+)\.", prompt).group(1))
        if item in server.always_malformed or item in server.malformed_once:
            server.malformed_once.discard(item)
            return self.reply(200, {"choices": [{"message": {"role": "assistant", "content": "Model 1 wins."}}]})
        answers = re.findall(r"### (Model \d+)'s answer\n.*?\(worth (\d+)\)", prompt)
        content = json.dumps({label: {"score": int(worth), "comments": "as marked"} for label, worth in answers})
        self.reply(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})

    def reply(self, status, doc):
        data = json.dumps(doc).encode()
        self.send_response(status)
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
               for r in server.requests)
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


def test_without_a_judge_the_offline_scores_still_make_a_table(tmp_path, capsys):
    paths, _ = answers_files(tmp_path)
    evaluate.main(["judge", *paths])
    out = capsys.readouterr().out
    assert "ROUGE-L" in out and "reference-answer loss" in out and "judge score" not in out
    assert "GPT-5.1: OpenAI GPT-2 small 20.39" in out  # his published numbers, under the table


@pytest.mark.parametrize("case", ["unreachable", "no key", "refused", "not the same items", "unfinished"])
def test_bad_input_ends_in_one_line_and_leaves_no_results(tmp_path, capsys, monkeypatch, case):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    paths, _ = answers_files(tmp_path)
    args = ["judge", *paths, "--model", "m", "--out", str(tmp_path / "judgments.jsonl"), "--cache",
            str(tmp_path / "cache.jsonl"), "--retries", "1", "--retry-wait", "0"]
    server = StandIn(status=401)
    try:
        if case == "unreachable":
            args += ["--api-base", "http://127.0.0.1:9/v1"]
            message = "could not reach the judge at http://127.0.0.1:9/v1/chat/completions after 2 tries"
        elif case == "no key":
            message = "OPENAI_API_KEY is not set"
        elif case == "refused":
            args += ["--api-base", server.url]
            message = "refused the request (HTTP 401"
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
    assert not (tmp_path / "judgments.jsonl").exists()

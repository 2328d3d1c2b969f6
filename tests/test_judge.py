"""The AI judge (rewards.Judge) against a fake OpenAI-compatible server on 127.0.0.1, whose answers are computed
from the images it receives: a label from the image's colour, a ranking by brightness. So a test can check that
the right image got the right label or rank, after the client's shuffles, and how failures are handled."""
import base64
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

import ddpo_debias as dd
import rewards
from tests.test_edges import one_error_line, run_main

KEY = "sk-test-0123456789-secret"


class FakeJudge:
    """A chat-completions server in a thread. `script`: how to answer successive chat requests ("ok", "500", "429",
    "slow", "malformed"), "ok" once it runs out. Every request is kept: (path, headers, body, what it saw)."""

    def __init__(self, script=(), key=None):
        self.script, self.key, self.requests = list(script), key, []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code, obj=None, headers=()):
                data = json.dumps(obj or {"error": {"message": "fake failure"}}).encode()
                self.send_response(code)
                for name, value in (("Content-Type", "application/json"), *headers):
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if fake.key and self.headers.get("Authorization") != f"Bearer {fake.key}":
                    return self.reply(401)
                self.reply(200 if self.path == "/v1/models" else 404, {"data": [{"id": "fake-vlm"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = body["messages"][0]["content"]
                images = [Image.open(io.BytesIO(base64.b64decode(part["image_url"]["url"].split(",", 1)[1])))
                          for part in content if part["type"] == "image_url"]
                seen = [torch.from_numpy(np.array(im.convert("RGB"))).float().mean((0, 1)) / 255 for im in images]
                fake.requests.append((self.path, dict(self.headers), body, seen, [im.size for im in images]))
                step = fake.script.pop(0) if fake.script else "ok"
                if step in ("500", "429"):
                    return self.reply(int(step), headers=[("Retry-After", "0")] if step == "429" else [])
                if step == "slow":
                    time.sleep(1.0)
                if "Rank them" in content[0]["text"]:  # brightest first
                    order = sorted(range(len(seen)), key=lambda i: -seen[i].sum().item())
                    answer = {"ranking": [i + 1 for i in order]}
                else:
                    r, _, b = seen[0].tolist()
                    answer = {"class": "female" if r > b + 0.2 else "Male" if b > r + 0.2 else "unclear"}
                text = "I would say a woman." if step == "malformed" else "Sure: " + json.dumps(answer)
                self.reply(200, {"choices": [{"message": {"role": "assistant", "content": text}}],
                                 "usage": {"prompt_tokens": 100 * len(images), "completion_tokens": 7}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown(), self.server.server_close()


@pytest.fixture
def fake(request):
    server = FakeJudge(*getattr(request, "param", ()))
    yield server
    server.close()


def colours(*names):
    rgb = {"red": (0.9, 0.1, 0.1), "blue": (0.1, 0.1, 0.9), "grey": (0.5, 0.5, 0.5)}
    return torch.stack([torch.tensor(rgb[n]).view(3, 1, 1).expand(3, 8, 8) for n in names])


def judge(server, **kwargs):
    return rewards.Judge(server.url, "fake-vlm", "how good", **{"backoff": 0.01, "parallel": 2, **kwargs})


def test_labels_follow_the_images_and_the_request_is_a_chat_completion(fake, monkeypatch):
    monkeypatch.setenv(rewards.JUDGE_KEY_ENV, KEY)
    j = judge(fake, image_size=64)
    p = j(colours("red", "blue", "grey", "red", "blue"))
    assert p.tolist() == [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1.0, 0.0], [0.0, 1.0]]
    assert rewards.label_images(p) == ["female", "male", None, "female", "male"]
    assert len(fake.requests) == 5
    for path, headers, body, _, sizes in fake.requests:
        assert path == "/v1/chat/completions" and body["model"] == "fake-vlm" and sizes == [(64, 64)]
        text, image = body["messages"][0]["content"]
        assert body["messages"][0]["role"] == "user" and text["type"] == "text"
        assert image["type"] == "image_url" and image["image_url"]["url"].startswith("data:image/png;base64,")
        assert headers["Authorization"] == f"Bearer {KEY}" and KEY not in json.dumps(body)
    assert j.take_stats() == {"requests": 5, "retries": 0, "unparsed": 0, "prompt_tokens": 500, "completion_tokens": 35}
    assert KEY not in repr(j)


def test_labels_are_the_classes_asked_for_matched_by_name(fake):
    """The question lists --classes (here in the other order, as JSON answers to choose from); the answer "Male"
    is matched to the class "male" whatever its case, and P(class) follows the classes' order."""
    p = judge(fake, classes=("male", "female"))(colours("red", "blue", "grey"))
    assert p.tolist() == [[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]]
    text = fake.requests[0][2]["messages"][0]["content"][0]["text"]
    assert 'male, female?' in text and '{"class": "male"}, {"class": "female"}, {"class": "unclear"}' in text


def test_no_key_no_authorization_header(fake, monkeypatch):
    monkeypatch.delenv(rewards.JUDGE_KEY_ENV, raising=False)
    judge(fake)(colours("red"))
    assert "Authorization" not in fake.requests[0][1]


def test_ranks_map_back_to_the_right_images_after_shuffling(fake):
    """8 images of distinct brightness, two prompts (alternating), groups of 4: each request holds one prompt's
    images in a shuffled order, and each image's reward is its centred Borda score within its request."""
    images = torch.linspace(0.1, 0.9, 8).view(8, 1, 1, 1).expand(8, 3, 8, 8).clone()
    prompts = ["a nurse", "a pilot"] * 4
    scores = judge(fake, group=4).rank(images, prompts)
    assert len(fake.requests) == 2
    brightness = images[:, :, 0, 0].sum(1)
    shown_orders = []
    for _, _, body, seen, _ in fake.requests:
        shown = [int((brightness - s.sum()).abs().argmin()) for s in seen]  # which image was shown at each place
        shown_orders.append(shown)
        assert len({prompts[i] for i in shown}) == 1 and f'"{prompts[shown[0]]}"' in body["messages"][0]["content"][0]["text"]
        best_first = sorted(shown, key=lambda i: -brightness[i])
        assert scores[best_first].tolist() == pytest.approx([0.5, 1 / 6, -1 / 6, -0.5])
    assert any(order != sorted(order) for order in shown_orders)  # the layout was shuffled


def test_a_lone_image_and_an_unparsed_ranking_score_zero(fake):
    fake.script = ["malformed", "malformed"]
    j = judge(fake, group=2)
    scores = j.rank(torch.rand(3, 3, 8, 8), ["p"] * 3)  # one group of 2 (unparsed twice: a tie), one image alone
    assert scores.tolist() == [0.0, 0.0, 0.0] and len(fake.requests) == 2
    assert j.take_stats()["unparsed"] == 1


def test_a_malformed_answer_is_asked_again_once_then_unclear(fake):
    fake.script = ["malformed", "ok", "malformed", "malformed"]
    j = judge(fake, parallel=1)
    assert j(colours("red")).tolist() == [[1.0, 0.0]]  # the second answer was good
    assert j(colours("blue")).tolist() == [[0.5, 0.5]]  # twice unparsed: unclear, not a guess
    assert j.take_stats() == {"requests": 4, "retries": 0, "unparsed": 1, "prompt_tokens": 400, "completion_tokens": 28}


def test_500_429_and_a_timeout_are_retried(fake):
    fake.script = ["500", "429", "slow", "ok"]
    j = judge(fake, parallel=1, timeout=0.3)
    assert j(colours("blue")).tolist() == [[0.0, 1.0]]
    assert j.take_stats()["retries"] == 3


def test_a_judge_that_keeps_failing_is_one_error(fake, monkeypatch):
    monkeypatch.setenv(rewards.JUDGE_KEY_ENV, KEY)
    fake.script = ["500"] * 10
    with pytest.raises(rewards.JudgeError) as error:
        judge(fake, retries=2)(colours("red", "blue"))
    message = str(error.value)
    assert "failed 3 times" in message and "HTTP 500" in message and KEY not in message and "\n" not in message


def test_a_wrong_key_is_refused_at_the_start(monkeypatch):
    server = FakeJudge(key=KEY)
    try:
        monkeypatch.setenv(rewards.JUDGE_KEY_ENV, "sk-wrong")
        with pytest.raises(rewards.JudgeError, match="HTTP 401.*JUDGE_API_KEY"):
            judge(server).check()
        monkeypatch.setenv(rewards.JUDGE_KEY_ENV, KEY)
        judge(server).check()
    finally:
        server.close()


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


@pytest.mark.parametrize("case", ["unreachable", "no-model", "no-url", "unused-url", "not-http"])
def test_bad_judge_input_is_one_line(tiny_sd, tiny_classifier, tmp_path, capsys, case):
    url = closed_port_url()
    judged = {"unreachable": ["--judge-url", url, "--judge-model", "m"], "no-model": ["--judge-url", url],
              "no-url": ["--judge-model", "m"], "not-http": ["--judge-url", "localhost:8000/v1", "--judge-model", "m"]}
    args = (["--reward", "balance", "--judge-url", url, "--judge-model", "m"] if case == "unused-url"
            else ["--labeller", "judge", *judged[case]])
    start = time.time()
    result = run_main(capsys, "--model", tiny_sd, "--classifier", tiny_classifier, *args, "--epochs", "1",
                      "--batch-size", "2", "--num-steps", "3", "--output-dir", tmp_path / "run")
    flag = {"no-model": "--judge-model", "no-url": "--judge-url"}.get(case, "--judge-url")
    assert one_error_line(result, flag), result.stderr[-2000:]
    assert time.time() - start < 10  # refused at the start, not after minutes of retries


@pytest.mark.parametrize("labeller, reward", [("judge", "balance"), ("classifier", "rank")])
def test_cli_end_to_end_with_the_judge(fake, tiny_sd, tiny_classifier, tmp_path, capsys, monkeypatch, labeller, reward):
    monkeypatch.setenv(rewards.JUDGE_KEY_ENV, KEY)
    out = tmp_path / "run"
    group = ["--judge-group", "2"] if reward == "rank" else []  # refused where it would be ignored
    result = run_main(capsys, "--model", tiny_sd, "--classifier", tiny_classifier, "--labeller", labeller, "--reward",
                      reward, "--judge-url", fake.url, "--judge-model", "fake-vlm", *group, "--epochs",
                      "2", "--batch-size", "4", "--num-steps", "3", "--mixed-precision", "no", "--output-dir", out)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_epoch = 4 if labeller == "judge" else 2  # an image each, or a group of 2 each
    assert [m["judge"]["requests"] for m in metrics] == [per_epoch, per_epoch]
    assert len(fake.requests) == 2 * per_epoch  # chat requests only: GET /models at the start is not kept
    assert all(m["judge"]["prompt_tokens"] == 100 * 4 for m in metrics)
    if reward == "rank":  # within each group of 2, one image +1/2, the other -1/2
        assert all(m["reward_mean"] == 0.0 and m["reward_std"] == pytest.approx(0.5774, abs=1e-3) for m in metrics)
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt"):
        assert KEY.encode() not in (out / name).read_bytes()
    assert KEY not in result.stderr

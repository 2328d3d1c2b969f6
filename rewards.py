"""AI feedback for ddpo-debias: a gender classifier and the two rewards of arXiv 2407.09551.

The policy (Stable Diffusion) draws a batch of B faces; this file turns them into one reward per image.

    GenderClassifier   any transformers image classifier with female/male labels -> P(female), (B,)
    label_images       P(female) -> "female" / "male" / None, at the paper's confidence level 0.7
    female_ratio       q of eq. (2), or None when no image is confidently female or male
    r_shift            eq. (1): R_shift(x, U) = P(x shows U), U the under-represented gender
    r_balance          eq. (2)-(3): q = F / (F + M); minority images get |q - 0.5|, all others -|q - 0.5|
    r_soft_balance     not in the paper: eq. (2)-(3) on P(female) instead of labels, for a strong bias
    r_rank, borda      the judge's ranking as a reward: centred Borda scores
    REWARDS            name -> reward function (one signature), so that the training script picks one by name
    PromptHistory      each prompt's last N P(female) and rewards: q per prompt, advantage statistics per prompt;
                       its score() is what the training loop calls
Then, not the method: the judge's HTTP client (Judge), the prompts file (read_prompts), the held-out evaluation's
statistics (HELD_OUT, bias_report, overall, report_table, compare_reports) and the pictures (save_grid, save_plot).

Shapes: B images; images are float tensors (B, 3, H, W) in [0, 1] on any device.
"""
import base64
import concurrent.futures
import http.client
import io
import json
import math
import os
import random
import threading
import time
import urllib.error
import urllib.request

import torch
import torch.nn.functional as F
from tqdm import tqdm

THRESHOLD = 0.7  # the paper's confidence level: a label counts only where its probability is above it
FEMALE_NAMES = ("female", "woman", "women")
MALE_NAMES = ("male", "man", "men")


def _find_label(id2label: dict, names: tuple) -> int | None:
    """Index of the first label whose lower-cased name is in `names`; by name, never by position."""
    for index, label in id2label.items():
        if str(label).strip().lower() in names:
            return int(index)
    return None


class LabelError(ValueError):
    """The classifier has no female or no male label."""


class ModelInputs:
    """An image processor's preprocessing, in torch on the images' device, so images never leave the GPU for PIL:
    its size, mean and std (from AutoImageProcessor), a bilinear resize and the normalisation."""

    def __init__(self, processor, device, dtype):
        size = processor.size  # {"height", "width"} for ViT; {"shortest_edge"} for some others
        side = size.get("shortest_edge")
        self.size, self.dtype = (size.get("height", side), size.get("width", side)), dtype
        # (1, 3, 1, 1) so that they broadcast over (B, 3, H, W)
        self.mean = torch.tensor(processor.image_mean, device=device, dtype=dtype).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std, device=device, dtype=dtype).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> pixel_values (B, 3, *size), normalised."""
        pixels = images.to(device=self.mean.device, dtype=self.dtype)
        # antialias=True matches PIL's bilinear resize (which the image processor uses) when shrinking
        pixels = F.interpolate(pixels, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        return (pixels - self.mean) / self.std


class GenderClassifier:
    """P(female) for a batch of images, from a transformers image-classification model.

    The image processor's constants (size, mean, std) come from `AutoImageProcessor`; the resize and
    normalisation run in torch on the images' own device, so images never leave the GPU for PIL.
    """

    def __init__(self, model_name_or_path: str = "rizvandwiki/gender-classification-2", device="cpu",
                 dtype: torch.dtype = torch.float32):
        from transformers import AutoImageProcessor, AutoModelForImageClassification  # here: 3 s, only when used
        self.model = AutoModelForImageClassification.from_pretrained(model_name_or_path)
        self.model.to(device=device, dtype=dtype).eval().requires_grad_(False)  # feedback, never trained
        id2label = self.model.config.id2label
        self.female_index = _find_label(id2label, FEMALE_NAMES)
        self.male_index = _find_label(id2label, MALE_NAMES)
        if self.female_index is None or self.male_index is None:
            labels = ", ".join(str(label) for label in id2label.values())
            raise LabelError(f"classifier {model_name_or_path!r} needs a female and a male label; it has: {labels}")
        self.inputs = ModelInputs(AutoImageProcessor.from_pretrained(model_name_or_path), device, dtype)

    @torch.no_grad()  # the reward is a number handed to PPO: no gradient flows into the classifier
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> P(female) as float32 (B,)."""
        logits = self.model(pixel_values=self.inputs(images)).logits  # (B, num_labels)
        probs = logits.float().softmax(dim=-1)
        return probs[:, self.female_index]


def label_images(p_female: torch.Tensor | list, threshold: float = THRESHOLD) -> list:
    """(B,) P(female), a tensor or a list -> B labels: "female" where P(female) > threshold, "male" where
    1 - P(female) > threshold, else None (strictly greater, as in the paper). One host copy for a tensor."""
    values = p_female.tolist() if torch.is_tensor(p_female) else p_female
    return ["female" if p > threshold else "male" if 1.0 - p > threshold else None for p in values]


def female_ratio(labels: list) -> float | None:
    """q = F / (F + M), eq. (2); None when F + M = 0 (q is undefined: no image was confident)."""
    n_female, n_male = labels.count("female"), labels.count("male")
    return n_female / (n_female + n_male) if n_female + n_male else None


# Every reward takes (p_female (B,), labels [B], window, underrepresented, ranks) and returns (B,) on p_female's
# device. window: the P(female) (N,) of the prompt's last N images (PromptHistory), which q is taken over (None: the
# batch); underrepresented: U for R_shift; ranks: the judge's Borda scores (B,), for --reward rank only.
def r_shift(p_female: torch.Tensor, labels=None, window=None, underrepresented: str | None = None,
            ranks=None) -> torch.Tensor:
    """R_shift(x, U) = P(x shows U), eq. (1). (B,) -> (B,); P(male) = 1 - P(female) for a two-way classifier."""
    if underrepresented not in ("female", "male"):
        raise ValueError(f"underrepresented must be 'female' or 'male', got {underrepresented!r}")
    return p_female if underrepresented == "female" else 1.0 - p_female


def r_balance(p_female: torch.Tensor, labels: list, window: torch.Tensor | None = None, underrepresented=None,
              ranks=None) -> torch.Tensor:
    """R_balance, eq. (2)-(3): a reward per image that peaks, in the batch total, at q = 0.5.

    q = F / (F + M) over the labels of `window` (default: these labels, the paper's batch),
    d = |q - 0.5|, the minority is female if q < 0.5 else male.
    An image of the minority class gets +d; every other image, None images included, gets -d.
    With no None images the batch total is d·(n_min - n_maj) = -2·n·(q - 0.5)², zero only at q = 0.5.
    If F + M = 0, q is undefined and every reward is 0: there is no balance to reward.
    Returns float32 (B,) on p_female's device (the images' device, so that nothing is copied there later).
    """
    q = female_ratio(labels if window is None else label_images(window))
    if q is None:
        return torch.zeros(len(labels), device=p_female.device)
    d = abs(q - 0.5)
    minority = "female" if q < 0.5 else "male"  # at q = 0.5, d = 0 and the choice does not matter
    return torch.tensor([d if label == minority else -d for label in labels], dtype=torch.float32,
                        device=p_female.device)


def r_soft_balance(p_female: torch.Tensor, labels=None, window: torch.Tensor | None = None, underrepresented=None,
                   ranks=None) -> torch.Tensor:
    """Not in the paper: eq. (2)-(3) on probabilities instead of thresholded labels, for a strong bias.

    q̃ = mean P(female) over `window` (default: the batch), d = |q̃ - 0.5|, the minority m is female if q̃ < 0.5
    else male; image i gets d·(2·P_i(m) - 1): +d for a confident minority image, -d for a confident majority one,
    as eq. (3), and 0 for an unreadable one (P = 0.5). Unlike eq. (3), a batch with no minority image still ranks
    its images by how close they come to the minority, so the advantages are not all zero. (B,) -> (B,).
    """
    q = (p_female if window is None else window).mean()
    p_minority = torch.where(q < 0.5, p_female, 1.0 - p_female)
    return (q - 0.5).abs() * (2.0 * p_minority - 1.0)


def borda(place: int, k: int) -> float:
    """The centred Borda score of the image ranked place-th (0 = best) of k: from +1/2 for the best to -1/2."""
    return (k - 1 - place) / (k - 1) - 0.5


def r_rank(p_female: torch.Tensor, labels=None, window=None, underrepresented=None, ranks=None) -> torch.Tensor:
    """--reward rank: the judge's centred Borda scores (Judge.rank), computed before scoring."""
    return ranks


# EXERCISE: add a reward here (e.g. one that also balances age) and pick it with --reward. RESCORED lists the rewards
# that depend on the window's q: PromptHistory.score re-scores their window under today's q.
REWARDS = {"shift": r_shift, "balance": r_balance, "soft_balance": r_soft_balance, "rank": r_rank}
RESCORED = ("balance", "soft_balance")


# ------------------------------------------------------------------- many prompts: each prompt's own balance
class PromptHistory:
    """Each prompt's last N values of P(female) and of the reward, oldest first; N = --balance-window.

    With several prompts, q of eq. (2) is taken per prompt over its window, not over the batch: a batch balanced
    overall can hide "all nurses female, all engineers male", which is the stereotype. The rewards' window gives
    each prompt its own advantage mean and std (DDPO's per-prompt stat tracking), so that one prompt's reward scale
    does not drown another's. With one prompt and N = B, both windows hold exactly the epoch's batch: the paper's q
    and DDPO's batch statistics. Non-finite values (a NaN image) are not kept: they would poison N epochs' stats.
    """

    def __init__(self, prompts: list, size: int, underrepresented: str | None = None, announce: bool = True):
        self.prompts, self.size, self.announce = list(prompts), size, announce  # announce: print U when chosen
        self.windows = {"p_female": [[] for _ in self.prompts], "rewards": [[] for _ in self.prompts]}
        self.underrepresented = [underrepresented] * len(self.prompts)  # U per prompt for R_shift; None: not yet

    def add(self, key: str, prompt: int, values: list) -> list:
        """Append a prompt's new values to its `key` window, keep the last N; -> that window."""
        window = (self.windows[key][prompt] + [v for v in values if math.isfinite(v)])[-self.size:]
        self.windows[key][prompt] = window
        return window

    def score(self, name: str, p_female: torch.Tensor, prompt_ids: list, ranks=None):
        """Each prompt's images scored by REWARDS[name] against the prompt's own window; both windows updated.
        R_shift with U auto: U is chosen per prompt as the rarer gender in its first images (the paper's step 1),
        then kept. ranks: the judge's (B,) for --reward rank. -> rewards (B,) on p_female's device, the labels [B],
        a metrics row per prompt present. Two host copies: P(female) and the rewards."""
        reward, choose_u = REWARDS[name], name == "shift"
        p_list, values, rows = p_female.tolist(), torch.zeros_like(p_female), {}
        labels = label_images(p_list)
        groups = {p: [i for i, j in enumerate(prompt_ids) if j == p] for p in sorted(set(prompt_ids))}  # p's images
        for p, idx in groups.items():
            mine = [labels[i] for i in idx]
            if choose_u and self.underrepresented[p] is None:
                self.underrepresented[p] = "female" if mine.count("female") <= mine.count("male") else "male"
                if self.announce:  # with torchrun, rank 0 only
                    tqdm.write(f"under-represented gender U = {self.underrepresented[p]} for {self.prompts[p]!r} (auto: "
                               f"the rarer in its first {len(idx)} images)")
            window = self.add("p_female", p, [p_list[i] for i in idx])  # the prompt's last N, these included
            on_device = torch.tensor(window, device=p_female.device)  # (N,), for the reward
            values[idx] = reward(p_female[idx], mine, on_device, self.underrepresented[p],
                                 None if ranks is None else ranks[idx]).float()
            rows[p] = {"prompt": self.prompts[p], **bias_report(mine),  # eq. (2) on this epoch's images of p
                       "window_female_ratio": female_ratio(label_images(window)),  # the q that R_balance used
                       "underrepresented": self.underrepresented[p]}
        per_image = values.tolist()  # one host sync for the rewards' windows (the advantages' statistics)
        for p, idx in groups.items():
            mine = [per_image[i] for i in idx]
            # The window's rewards give the mean and std that standardise today's (compute_advantages). R_balance's
            # size |q - 0.5| and its rewarded class are today's q's, so a reward stored under an older q would skew
            # them: re-score the whole window under today's q (on the CPU, where the window already is). R_shift
            # (U is fixed once chosen) and rank (Borda scores within a group, which only the judge could re-score)
            # keep their rewards as given.
            if name in RESCORED:
                window = torch.tensor(self.windows["p_female"][p])  # (N,)
                self.windows["rewards"][p] = reward(window, label_images(window), window).tolist()
            else:
                self.add("rewards", p, mine)
            rows[p]["reward_mean"] = sum(mine) / len(mine) if all(map(math.isfinite, mine)) else None  # JSON: no NaN
        return values, labels, list(rows.values())

    def state_dict(self) -> dict:
        return {"prompts": self.prompts, "windows": self.windows, "underrepresented": self.underrepresented}

    def load_state_dict(self, state: dict):
        self.windows, self.underrepresented = state["windows"], state["underrepresented"]


# --------------------------------------------------------- the AI judge: a chat model that sees the images
# The second source of feedback: a vision-language model behind any OpenAI-compatible chat-completions endpoint
# (a hosted API, vLLM, llama.cpp's server, Ollama) labels each image, or ranks the batch's images in groups: RLHF
# with a chat model as the annotator. Standard library only: urllib, json, base64, threads.
JUDGE_KEY_ENV = "JUDGE_API_KEY"  # the API key's only source: never a flag, never logged, printed or saved
LABEL_QUESTION = ('Is the person in this image female or male? Answer with JSON only, one of {"gender": "female"}, '
                  '{"gender": "male"}, {"gender": "unclear"}; "unclear" if there is no face or you cannot tell.')
P_FEMALE = {"female": 1.0, "male": 0.0, "unclear": 0.5}  # a judge's label as P(female): label_images maps it back
RANK_QUESTION = ('These {k} images were generated for the prompt "{prompt}". Rank them, best first, by this '
                 'criterion: {criterion}. Answer with JSON only: {{"ranking": [...]}}, the image numbers 1 to {k} '
                 'each once, best first.')
RETRY_STATUS = (408, 429, 500, 502, 503, 504)  # worth another try: rate limits and a server's passing trouble


class JudgeError(Exception):
    """The judge cannot be reached or keeps failing: one line that names --judge-url and never holds the key."""


class Judge:
    """A chat model as the annotator: `judge(images)` -> P(female) (B,) from its labels, `rank` -> Borda rewards.

    Each request is a chat completion with the images as base64 PNG data URLs (image_size pixels square). A request
    gets `timeout` seconds; connection errors, timeouts, 408, 429 and 5xx are retried `retries` times with doubling
    waits from `backoff` seconds (429's Retry-After is honoured), then JudgeError. At most `parallel` requests are in
    flight. An answer that is not the JSON asked for is asked again once, then counted as "unclear" (labels) or a
    tie (ranks) and reported, never guessed. `take_stats()` gives the epoch's requests, retries, unparsed answers
    and tokens (from the responses' `usage`) for metrics.jsonl.
    """

    def __init__(self, url: str, model: str, criterion: str, group: int = 4, image_size: int = 256, seed: int = 0,
                 timeout: float = 120.0, retries: int = 4, parallel: int = 4, backoff: float = 1.0):
        self.url, self.model, self.criterion = url.rstrip("/"), model, criterion
        self.group, self.image_size = group, image_size
        self.timeout, self.retries, self.parallel, self.backoff = timeout, retries, parallel, backoff
        self._key = os.environ.get(JUDGE_KEY_ENV)  # read once, sent only in the Authorization header
        self._shuffle = random.Random(seed)  # the group layouts: a fresh shuffle per request against position bias
        self._lock, self.stats = threading.Lock(), None  # the counts, from the request threads
        self.take_stats()

    def __repr__(self):  # never the key
        return f"Judge({self.url!r}, model={self.model!r})"

    def take_stats(self) -> dict:
        """The counts since the last call (an epoch's), and zero them."""
        with self._lock:
            stats, self.stats = self.stats, dict.fromkeys(
                ("requests", "retries", "unparsed", "prompt_tokens", "completion_tokens"), 0)
        return stats

    def _count(self, **counts):
        with self._lock:
            for key, n in counts.items():
                self.stats[key] += n

    def _http(self, path: str, body: dict | None = None, retries: int | None = None) -> dict:
        """One call with retries (default: self.retries): GET when body is None, else POST of JSON. -> its JSON."""
        retries = self.retries if retries is None else retries
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"  # the only place the key goes
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(retries + 1):
            wait = self.backoff * 2**attempt
            try:
                request = urllib.request.Request(self.url + path, data=data, headers=headers)
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as error:
                reason = f"HTTP {error.code} {error.reason}"
                if error.code not in RETRY_STATUS:
                    raise JudgeError(f"{self.url}{path} answered {reason}" + (
                        f"; check the key in ${JUDGE_KEY_ENV}" if error.code in (401, 403) else "")) from None
                retry_after = error.headers.get("Retry-After", "")
                wait = min(float(retry_after), 60.0) if retry_after.replace(".", "", 1).isdigit() else wait
            except (OSError, http.client.HTTPException, ValueError) as error:  # refused, DNS, timeout (URLError and
                # TimeoutError are OSErrors), a connection cut mid-answer, a body that is not JSON
                reason = str(getattr(error, "reason", None) or error).splitlines()[0][:120] or type(error).__name__
            if attempt < retries:
                self._count(retries=1)
                time.sleep(wait)
        raise JudgeError(f"{self.url}{path} failed {retries + 1} time{'s' if retries else ''} (last: {reason})")

    def check(self):
        """At the start, one try: the server answers and takes the key. One without GET /models (404) passes."""
        try:
            self._http("/models", retries=0)
        except JudgeError as error:
            if "HTTP 404" not in str(error):
                raise

    def ask(self, text: str, images: list, parse, instead: str):
        """One chat completion with `images` (PNG bytes) after `text`; -> parse(the answer's JSON), or None when
        the answer is still not what parse wants after one more try: counted in "unparsed", reported as `instead`."""
        content = [{"type": "text", "text": text}] + [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}
            for png in images]
        body = {"model": self.model, "messages": [{"role": "user", "content": content}], "temperature": 0,
                "max_tokens": 200}
        for attempt in range(2):
            response = self._http("/chat/completions", body)
            usage = response.get("usage") or {}
            self._count(requests=1, prompt_tokens=usage.get("prompt_tokens") or 0,
                        completion_tokens=usage.get("completion_tokens") or 0)
            try:
                answer = response["choices"][0]["message"]["content"]
                return parse(json.loads(answer[answer.index("{"):answer.rindex("}") + 1]))  # the JSON in the answer
            except (KeyError, IndexError, TypeError, ValueError):
                pass
        self._count(unparsed=1)
        tqdm.write(f"judge: an answer was not the JSON asked for, twice; counted as {instead}")
        return None

    def _map(self, fn, items: list) -> list:
        """fn over items in `parallel` threads; the first JudgeError cancels the requests not yet sent."""
        pool = concurrent.futures.ThreadPoolExecutor(self.parallel)
        try:
            return list(pool.map(fn, items))
        finally:
            pool.shutdown(cancel_futures=True)

    def pngs(self, images: torch.Tensor) -> list:
        """(B, 3, H, W) in [0, 1] -> B PNG files, image_size pixels square."""
        from PIL import Image
        pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        files = []
        for pix in pixels:
            buffer = io.BytesIO()
            Image.fromarray(pix).resize((self.image_size, self.image_size), Image.BICUBIC).save(buffer, "PNG")
            files.append(buffer.getvalue())
        return files

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """The labeller: one request per image -> P(female) (B,) on the images' device: 1 female, 0 male, 0.5
        unclear (label_images turns these back into the labels, at any threshold in [0.5, 1))."""
        parse = lambda answer: P_FEMALE[answer["gender"]]  # KeyError for anything else: asked again
        answers = self._map(lambda png: self.ask(LABEL_QUESTION, [png], parse, "unclear"), self.pngs(images))
        return torch.tensor([0.5 if a is None else a for a in answers], device=images.device)

    def rank(self, images: torch.Tensor, prompts: list) -> torch.Tensor:
        """R_rank: each prompt's images (prompts [B], image i's prompt) shuffled into groups of `group`, each group
        ranked in one request -> (B,) centred Borda scores: in a group of k, the image ranked j-th (0 = best) gets
        (k - 1 - j)/(k - 1) - 1/2, from +1/2 for the best to -1/2 for the worst; a tie (an unparsed answer), or an
        image left alone in a group of one, gets 0."""
        pngs, scores, groups = self.pngs(images), [0.0] * len(prompts), []
        for prompt in dict.fromkeys(prompts):
            mine = [i for i, p in enumerate(prompts) if p == prompt]
            self._shuffle.shuffle(mine)  # which images meet, and in which order they are shown: random
            groups += [(prompt, mine[s:s + self.group]) for s in range(0, len(mine), self.group)]

        def ask(prompt, group):
            def parse(answer):  # the image numbers 1..k, each once: anything else is asked again
                ranking = answer["ranking"]
                if not isinstance(ranking, list) or sorted(ranking) != list(range(1, len(group) + 1)):
                    raise ValueError("not a ranking of every image")
                return ranking
            text = RANK_QUESTION.format(k=len(group), prompt=prompt, criterion=self.criterion)
            return group, self.ask(text, [pngs[i] for i in group], parse, "a tie")
        for group, ranking in self._map(lambda g: ask(*g), [g for g in groups if len(g[1]) > 1]):
            for j, shown in enumerate(ranking or []):  # shown: the 1-based place of the image in the request
                scores[group[shown - 1]] = borda(j, len(group))
        return torch.tensor(scores, device=images.device)


# ----------------------------------------------------------------------------- a prompts file (--prompts)
def read_prompts(path: str) -> tuple:
    """A prompts file, one prompt per line -> (prompts, blank lines skipped). A repeated prompt is refused: it would
    be one prompt with two windows. ValueError, one line, for a file that cannot be read or holds no prompt."""
    try:
        with open(path) as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {path} ({getattr(error, 'strerror', None) or error})") from None
    prompts = [line for line in lines if line]
    if not prompts:
        raise ValueError(f"{path} holds no prompt")
    for number, prompt in enumerate(lines, 1):
        if prompt and lines.index(prompt) + 1 < number:
            raise ValueError(f"line {number} of {path} repeats line {lines.index(prompt) + 1} ({prompt[:50]!r}); "
                             "give each prompt once")
    return prompts, len(lines) - len(prompts)


# ------------------------------------------------------------------ held-out evaluation (ddpo_debias --evaluate)
# Occupations never trained on, in the paper's face-prompt style: a mix that SD draws mostly male, mostly female
# and mixed (after the occupation lists of Bianchi et al. 2023 and Shen et al. 2024's test split).
HELD_OUT = tuple(f"photo of the face of {'an' if job[0] in 'aeiou' else 'a'} {job}" for job in (
    "mechanical engineer", "electrician", "pilot", "plumber", "firefighter", "software developer", "surgeon",
    "chef", "lawyer", "professor", "accountant", "pharmacist", "journalist", "police officer", "farmer",
    "nurse", "librarian", "receptionist", "hairdresser", "flight attendant", "social worker", "teacher",
    "dental hygienist", "fashion designer"))


def wilson_interval(successes: int, n: int, z: float = 1.96) -> list | None:
    """The 95% Wilson score interval of a proportion successes/n; None when n = 0."""
    if n == 0:
        return None
    p, z2 = successes / n, z * z
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * (p * (1 - p) / n + z2 / (4 * n * n)) ** 0.5 / (1 + z2 / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]  # clamped: rounding can step past 0 or 1


def bias_report(labels: list) -> dict:
    """One prompt's row of eval.json, from its images' labels: counts, q with its Wilson interval, Shen et al.'s
    bias |f_male - f_female| over the confidently labelled images (= |1 - 2q|), and the share labelled none."""
    n_female, n_male, n_none = labels.count("female"), labels.count("male"), labels.count(None)
    q = female_ratio(labels)
    return {"n_female": n_female, "n_male": n_male, "n_none": n_none, "female_ratio": q,
            "female_ratio_95": wilson_interval(n_female, n_female + n_male),
            "bias": None if q is None else abs(1 - 2 * q), "none_rate": n_none / len(labels)}


def overall(rows: list) -> dict:
    """Means over the prompts whose q is defined (mean bias, mean |q - 0.5|), the none-rate of all images, and the
    means of the prompts' CLIP-T and CLIP-I where they were computed (quality_report)."""
    defined = [r for r in rows if r["female_ratio"] is not None]
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    return {"mean_bias": mean([r["bias"] for r in defined]),
            "mean_abs_q_minus_half": mean([abs(r["female_ratio"] - 0.5) for r in defined]),
            "none_rate": sum(r["n_none"] for r in rows) / sum(r["n_female"] + r["n_male"] + r["n_none"] for r in rows),
            "mean_clip_t": mean([r["clip_t"] for r in rows if r.get("clip_t") is not None]),
            "mean_clip_i": mean([r["clip_i"] for r in rows if r.get("clip_i") is not None])}


class QualityModel:
    """Did the images survive? Unit image (and text) embeddings from --clip-model, for Shen et al.'s (ICLR 2024)
    quality numbers beside the bias (quality_report). A CLIP (get_image_features and get_text_features) gives both
    CLIP-T and CLIP-I; any other transformers image model (e.g. the toy world's ViT) gives image embeddings only,
    its [CLS] token's, so CLIP-I only. Preprocessing as GenderClassifier's (ModelInputs)."""

    def __init__(self, model_name_or_path: str, device="cpu", batch: int = 32):
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
        try:
            processor = AutoImageProcessor.from_pretrained(model_name_or_path)
        except (OSError, ValueError) as error:
            raise QualityModelError(f"{model_name_or_path} has no image processor, so it is not an image model "
                                    f"({str(error).splitlines()[0][:100]})") from None
        from transformers.utils import logging as hf_logging
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # an image classifier loads as its encoder: its head is left out, by design
        try:
            self.model = AutoModel.from_pretrained(model_name_or_path).to(device).eval().requires_grad_(False)
        finally:
            hf_logging.set_verbosity(verbosity)
        self.is_clip = hasattr(self.model, "get_image_features") and hasattr(self.model, "get_text_features")
        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path) if self.is_clip else None
        self.inputs, self.batch, self.device = ModelInputs(processor, device, torch.float32), batch, device

    @torch.no_grad()
    def images(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> unit embeddings (B, D), float32, in batches of `batch`."""
        out = []
        for chunk in images.split(self.batch):
            pixels = self.inputs(chunk)
            if self.is_clip:
                features = self.model.get_image_features(pixel_values=pixels)
            else:  # an image encoder: its [CLS] token (a classifier's pooler, if any, is not trained)
                features = self.model(pixel_values=pixels).last_hidden_state[:, 0]
            out.append(F.normalize(_tensor(features).float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def texts(self, prompts: list) -> torch.Tensor | None:
        """prompts [P] -> unit text embeddings (P, D); None for a model without a text tower."""
        if not self.is_clip:
            return None
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return F.normalize(_tensor(self.model.get_text_features(**tokens)).float(), dim=-1)


class QualityModelError(ValueError):
    """--clip-model is not an image model."""


def _tensor(features):
    """get_*_features return a tensor (transformers 4) or an output whose pooler_output is it (transformers 5)."""
    return features if torch.is_tensor(features) else features.pooler_output


def quality_report(embeddings: torch.Tensor, text: torch.Tensor | None, base: torch.Tensor | None) -> dict:
    """One prompt's quality numbers, per image and as the mean, from unit embeddings (QualityModel):
    CLIP-T, the cosine of each image (n, D) with its prompt's text (D,); CLIP-I, the cosine of each image with the
    base model's image of the same seed (n, D). None where the model has no text tower, or without --compare."""
    clip_t = None if text is None else (embeddings @ text).tolist()
    clip_i = None if base is None else (embeddings * base.to(embeddings.device)).sum(dim=-1).tolist()
    mean = lambda xs: None if xs is None else sum(xs) / len(xs)
    return {"clip_t": mean(clip_t), "clip_i": mean(clip_i), "clip_t_images": clip_t, "clip_i_images": clip_i}


def report_table(report: dict) -> str:
    """eval.json as a table: a row per prompt (counts, q with its interval, bias, CLIP-T, CLIP-I), then the overall
    means. "-": not defined (no labelled image, no text tower, no --compare)."""
    lines = [f"{'prompt':48s} {'F':>4s} {'M':>4s} {'none':>5s}  {'q [95% interval]':20s} {'bias':>5s} "
             f"{'CLIP-T':>6s} {'CLIP-I':>6s}"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    for r in report["prompts"]:
        q = "-" if r["female_ratio"] is None else "{:.2f} [{:.2f}, {:.2f}]".format(r["female_ratio"], *r["female_ratio_95"])
        lines.append(f"{r['prompt'][-48:]:48s} {r['n_female']:4d} {r['n_male']:4d} {r['n_none']:5d}  {q:20s} "
                     f"{fmt(r['bias']):>5s} {fmt(r.get('clip_t')):>6s} {fmt(r.get('clip_i')):>6s}")
    return "\n".join(lines + ["overall: " + ", ".join(f"{k} {v:.3f}" for k, v in report["overall"].items() if v is not None)])


PAIRED = ("images_per_prompt", "seed", "num_steps", "guidance_scale")  # what must match for the same noise per image


def read_paired_report(base_path: str, settings: dict, prompts: list) -> dict:
    """The eval.json at base_path, checked to be paired with an evaluation of `prompts` under `settings` (PAIRED's
    keys): the same prompts in the same order and the same noise for each image. Cheap, so --evaluate checks it
    before sampling. Raises ValueError for a file that is not an eval.json or not paired."""
    try:
        with open(base_path) as f:
            base = json.load(f)
        unpaired = [k for k in PAIRED if base[k] != settings[k]]
        base_prompts = [r["prompt"] for r in base["prompts"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{base_path} is not an eval.json ({error})") from None
    if base_prompts != list(prompts):
        unpaired.append("prompts")
    if unpaired:
        raise ValueError(f"{base_path} is not paired with this evaluation: other " + ", ".join(
            f"{k} ({base[k]!r}, here {settings[k]!r})" for k in unpaired if k in settings) +
            (" and other prompts" if "prompts" in unpaired else ""))
    return base


def compare_reports(base_path: str, report: dict, png_path: str) -> str:
    """Base -> this model, prompt by prompt and overall: a bar chart of the bias in png_path, and the table it
    returns. Raises ValueError as read_paired_report."""
    from PIL import Image, ImageDraw
    base = read_paired_report(base_path, report, [r["prompt"] for r in report["prompts"]])
    before = {r["prompt"]: r for r in base["prompts"]}
    fmt = lambda v: "  -  " if v is None else f"{v:.2f}"
    lines = [f"{'prompt':48s} {'q: base -> this':>16s} {'bias: base -> this':>19s} {'CLIP-T: base -> this':>21s} "
             f"{'CLIP-I':>6s}"]
    for r in report["prompts"]:
        b = before[r["prompt"]]
        lines.append(f"{r['prompt'][-48:]:48s} {fmt(b['female_ratio']):>7s} -> {fmt(r['female_ratio']):5s} "
                     f"{fmt(b['bias']):>10s} -> {fmt(r['bias']):5s} {fmt(b.get('clip_t')):>12s} -> "
                     f"{fmt(r.get('clip_t')):5s} {fmt(r.get('clip_i')):>6s}")
    base_overall, this_overall = overall(base["prompts"]), report["overall"]
    mean_bias = (base_overall["mean_bias"], this_overall["mean_bias"])
    lines.append(f"{'overall (means over the prompts)':48s} {'':16s} {fmt(mean_bias[0]):>10s} -> "
                 f"{fmt(mean_bias[1]):5s} {fmt(base_overall['mean_clip_t']):>12s} -> "
                 f"{fmt(this_overall.get('mean_clip_t')):5s} {fmt(this_overall.get('mean_clip_i')):>6s}")
    # The picture: a bar pair per prompt, named by what its words do not share with the others' (the occupation),
    # then the overall mean bias.
    words = [r["prompt"].split() for r in report["prompts"]]
    shared = 0  # words at the start that every prompt has ("photo of the face of a"), but never a whole prompt
    while len(words) > 1 and all(len(w) > shared + 1 and w[shared] == words[0][shared] for w in words):
        shared += 1
    bars = [(shorten(" ".join(w[shared:])), before[r["prompt"]]["bias"], r["bias"],
             (before[r["prompt"]].get("clip_t"), r.get("clip_t"), r.get("clip_i")))
            for w, r in zip(words, report["prompts"])]
    bars.append(("overall (mean)", *mean_bias,
                 (base_overall["mean_clip_t"], this_overall.get("mean_clip_t"), this_overall.get("mean_clip_i"))))
    row, width, x0, top, x_quality = 18, 720, 170, 24, 570
    scale = lambda v: x0 + (x_quality - x0 - 14) * v  # bias 0..1 -> x
    image = Image.new("RGB", (width, top + row * len(bars) + 26), "white")
    draw = ImageDraw.Draw(image)
    common = f' "{" ".join(words[0][:shared])} ..."' if shared else ""
    draw.text((4, 4), f"bias |f_male - f_female| per prompt{common}: grey base, blue this model", fill="black")
    draw.text((x_quality, 4), "CLIP-T: base > this", fill="black"), draw.text((x_quality + 100, 4), "CLIP-I", fill="black")
    for i, (name, b, t, quality) in enumerate(bars):
        y = top + i * row
        if i == len(bars) - 1:  # the overall row, under a rule
            draw.line((4, y - 2, width - 4, y - 2), fill="gray")
        draw.text((4, y), name, fill="black")
        for value, offset, colour in ((b, 0, "gray"), (t, 7, "blue")):
            if value is None:
                draw.text((x0 + 2, y + offset - 3), "n/a (no image labelled)", fill=colour)
            else:
                draw.rectangle((x0, y + offset, scale(value), y + offset + 6), fill=colour)
        clip_t_base, clip_t, clip_i = (fmt(v).strip() for v in quality)
        draw.text((x_quality, y + 2), f"{clip_t_base} > {clip_t}", fill="black")
        draw.text((x_quality + 100, y + 2), clip_i, fill="black")
    axis = top + row * len(bars) + 2
    draw.line((x0, axis, scale(1.0), axis), fill="gray")
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):  # the x-axis scale
        draw.line((scale(v), axis, scale(v), axis + 4), fill="gray")
        draw.text((scale(v) - 8, axis + 6), f"{v:g}", fill="black")
    image.save(png_path)
    return "\n".join(lines)


def shorten(prompt: str, limit: int = 26) -> str:
    """A prompt's label in a picture: its end, where the occupation is, cut at a word ("...software developer")."""
    if len(prompt) <= limit:
        return prompt
    words, label = prompt.split(), ""
    while words and len(words[-1]) + len(label) + 1 <= limit - 3:
        label = f"{words.pop()} {label}".strip()
    return "..." + (label or prompt[-(limit - 3):])


# ------------------------------------------------------- pictures of the feedback (ddpo_debias.py's run folder)
def save_grid(images, p_female, labels, title, path, thumb=128):
    """A PNG of the epoch's images (B, 3, H, W) in [0, 1] under a title, each captioned "label P(female)"; √B
    columns (at least 4), so that B = 16 is 4x4 and B = 64 is 8x8."""
    from PIL import Image, ImageDraw
    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # one copy, once per epoch
    columns = max(4, math.isqrt(len(pixels)))
    rows, top = math.ceil(len(pixels) / columns), 16
    grid = Image.new("RGB", (columns * thumb, top + rows * (thumb + 14)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((3, 2), f"{title}: label at P > {THRESHOLD}, and P(female)", fill="black")
    for i, (pix, p, label) in enumerate(zip(pixels, p_female.tolist(), labels)):
        x, y = (i % columns) * thumb, top + (i // columns) * (thumb + 14)
        grid.paste(Image.fromarray(pix).resize((thumb, thumb)), (x, y))
        draw.text((x + 3, y + thumb + 1), f"{label or 'none'} {p:.2f}", fill="black")
    grid.save(path)


def save_plot(metrics, path, width=520, height=170):
    """reward_mean and female_ratio against the epoch, one panel each, with axes, ticks and the q = 0.5 line; with
    several prompts, also each prompt's window q (metrics' per_prompt), a thin line per prompt labelled p0, p1, ...
    at its end and named in a legend under the panels; with --eval-every, a third panel of the held-out check's
    bias, none-rate, CLIP-T and CLIP-I."""
    from PIL import Image, ImageDraw
    prompts = list(dict.fromkeys(r["prompt"] for m in metrics for r in m.get("per_prompt", [])))
    prompts = prompts if len(prompts) > 1 else []
    keys = ("reward_mean", "female_ratio") + (("held_out",) if any(m.get("held_out") for m in metrics) else ())
    image = Image.new("RGB", (width, len(keys) * height + (14 * len(prompts) + 6 if prompts else 0)), "white")
    draw = ImageDraw.Draw(image)
    last = max(metrics[-1]["epoch"] if metrics else 1, 1)
    for panel, key in enumerate(keys):
        points = [(m["epoch"], m[key]) for m in metrics if key != "held_out" and m[key] is not None]
        values = [v for _, v in points] or [0.0]
        low, high = (0.0, 1.0) if key in ("female_ratio", "held_out") else (min(values), max(values))
        high = high if high > low else low + 1e-6
        x0, y0, x1, y1 = 52, panel * height + 18, width - 30, (panel + 1) * height - 30  # the panel's frame
        to_xy = lambda e, v: (x0 + (x1 - x0) * e / last, y1 - (y1 - y0) * (v - low) / (high - low))
        draw.rectangle((x0, y0, x1, y1), outline="gray")
        now = f"last = {points[-1][1]:.3f}" if points else "no value yet"  # "=": the font's space is 1 pixel wide
        draw.text((x0, y0 - 15), "held-out check (--eval-every)" if key == "held_out" else f"{key} ({now})",
                  fill="black")
        for v in (low, (low + high) / 2, high):  # y ticks
            y = to_xy(0, v)[1]
            draw.line((x0 - 4, y, x0, y), fill="gray"), draw.text((4, y - 6), f"{v:.2f}", fill="black")
        step = next(s for s in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 10**9) if last / s <= 10)
        for e in range(0, last + 1, step):  # x ticks: every epoch up to 10, then a round step
            x = to_xy(e, low)[0]
            draw.line((x, y1, x, y1 + 4), fill="gray"), draw.text((x - 3 * len(str(e)), y1 + 5), str(e), fill="black")
        draw.text(((x0 + x1) / 2 - 14, y1 + 16), "epoch", fill="black")
        if key == "female_ratio":  # the balance target
            y = to_xy(0, 0.5)[1]
            draw.line((x0, y, x1, y), fill="lightgray"), draw.text((x0 + 4, y - 13), "q = 0.5", fill="gray")
        lines = [("blue", 2, "", points)]
        if key == "held_out":  # the held-out check's numbers, each a line labelled at its end
            lines = [(colour, 1, name, [(m["epoch"], m["held_out"][field]) for m in metrics if m.get("held_out")
                                        and m["held_out"][field] is not None])
                     for colour, name, field in (("red", "bias", "mean_bias"), ("gray", "none", "none_rate"),
                                                 ("green", "CLIP-T", "mean_clip_t"), ("blue", "CLIP-I", "mean_clip_i"))]
        if key == "female_ratio" and prompts:  # many prompts: each one's window q, labelled p0, p1, ...
            lines += [(PALETTE[i % len(PALETTE)], 1, f"p{i}", [(m["epoch"], r["window_female_ratio"]) for m in metrics
                      for r in m["per_prompt"] if r["prompt"] == prompt and r["window_female_ratio"] is not None])
                      for i, prompt in enumerate(prompts)]
        ends = []  # (y, label, colour) of each labelled line's last point
        for colour, thickness, name, series in lines:
            xy = [to_xy(e, v) for e, v in series]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=thickness)
            elif xy:
                draw.ellipse((xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2), fill=colour)
            if name and xy:
                ends.append((xy[-1][1], name, colour))
        y_free = -math.inf
        for y, name, colour in sorted(ends):  # labels right of the frame, pushed apart so that none hides another
            y_free = max(y, y_free + 11)
            draw.text((x1 + 4, y_free - 6), name, fill=colour)
    for i, prompt in enumerate(prompts):  # the legend: which prompt each label is
        draw.text((x0, len(keys) * height + 2 + 14 * i), f"p{i}  {prompt}", fill=PALETTE[i % len(PALETTE)])
    image.save(path)


PALETTE = ("darkorange", "green", "red", "purple", "brown", "deeppink", "olive", "teal")  # save_plot's prompt lines

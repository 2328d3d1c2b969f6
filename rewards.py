"""AI feedback for ddpo-debias: a classifier and the rewards of arXiv 2407.09551, for two classes or K.

The policy (Stable Diffusion) draws a batch of B faces, a classifier gives P(class) (B, K) of each image for the K
classes named by --classes (female, male by default), and this file turns them into one reward per image.

    label_images       P(class) -> a class name, or None, at the paper's confidence level 0.7
    class_shares       p̂_k = n_k / Σ n_j over the labelled images; female_ratio: q of eq. (2), p̂_female
    r_shift            eq. (1): R_shift(x, U) = P(x shows U), U the under-represented class
    r_balance          eq. (2)-(3) for K classes: an image of class c gets t_c - p̂_c (t: --target, uniform by
                       default); for K = 2 that is |q - 0.5| for the minority and -|q - 0.5| for the majority
    r_soft_balance     not in the paper: the same on P(class) instead of labels, for a strong bias
    r_rank, borda      the judge's ranking as a reward: centred Borda scores
    REWARDS            name -> reward function (one signature), so that the training script picks one by name
    PromptHistory      each prompt's last N P(class) and rewards: shares per prompt, advantage statistics per prompt;
                       its score() is what the training loop calls
Then, not the method (a reader of it can stop after PromptHistory): the classifier (Classifier: any transformers
image classifier -> P(class), its labels found by name; two for "a&b" classes), the judge's HTTP client (Judge),
the prompts file (read_prompts), the held-out evaluation's statistics (HELD_OUT, bias_report, overall,
report_table, compare_reports) and the pictures (save_grid, save_plot).

Shapes: B images, K classes; images are float tensors (B, 3, H, W) in [0, 1] on any device.
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
GENDER = ("female", "male")  # the default classes (--classes), the paper's


def uniform(classes) -> dict:
    """The default target (--target): every class an equal share, {class: 1/K}."""
    return {c: 1 / len(classes) for c in classes}


def label_images(probs: torch.Tensor | list, classes=GENDER, threshold: float = THRESHOLD) -> list:
    """(B, K) P(class), a tensor or nested lists -> B labels: the most probable class where its probability is above
    threshold, else None (strictly greater, as in the paper; above 0.5 at most one class can be, so the "most
    probable" only matters for a threshold below 0.5, --threshold). One host copy for a tensor."""
    rows = probs.tolist() if torch.is_tensor(probs) else probs
    return [classes[row.index(max(row))] if max(row) > threshold else None for row in rows]


def class_shares(labels: list, classes=GENDER) -> list | None:
    """p̂_k = n_k / Σ_j n_j over the confidently labelled images, one per class: eq. (2)'s q = F / (F + M) for
    K = 2 is p̂_female. None when no image is labelled (the shares are undefined)."""
    counts = [labels.count(c) for c in classes]
    n = sum(counts)
    return [count / n for count in counts] if n else None


def female_ratio(labels: list) -> float | None:
    """q = F / (F + M), eq. (2); None when F + M = 0 (q is undefined: no image was confident)."""
    shares = class_shares(labels, GENDER)
    return shares[0] if shares else None


# Every reward takes (probs (B, K), labels [B], window, target, underrepresented, ranks) and returns (B,) on probs'
# device. window: the P(class) (N, K) of the prompt's last N images (PromptHistory), which the shares are taken over
# (None: the batch); target: {class: t_c}, the shares to reach, in the classes' order (default: uniform over
# female, male); underrepresented: U for R_shift; ranks: the judge's Borda scores (B,), for --reward rank only;
# threshold: the confidence above which an image has a label (the paper's 0.7, --threshold).
def r_shift(probs: torch.Tensor, labels=None, window=None, target=None, underrepresented: str | None = None,
            ranks=None, threshold=THRESHOLD) -> torch.Tensor:
    """R_shift(x, U) = P(x shows U), eq. (1): U's column of probs (B, K) -> (B,)."""
    classes = list(target or GENDER)
    if underrepresented not in classes:
        raise ValueError(f"underrepresented must be one of {', '.join(classes)}, got {underrepresented!r}")
    return probs[:, classes.index(underrepresented)]


def r_balance(probs: torch.Tensor, labels: list, window: torch.Tensor | None = None, target: dict | None = None,
              underrepresented=None, ranks=None, threshold: float = THRESHOLD) -> torch.Tensor:
    """R_balance, eq. (2)-(3) for K classes: an image of class c gets t_c - p̂_c.

    p̂ = class_shares over the labels of `window` (default: these labels, the paper's batch), t = target.
    For K = 2 and t = (½, ½), q = p̂_female: a female image gets ½ - q and a male image ½ - (1 - q) = q - ½, which
    is eq. (3)'s |q - ½| for the minority and -|q - ½| for the majority. An image with no confident label gets what
    the most over-represented class gets, min_c (t_c - p̂_c): eq. (3)'s -|q - ½| for K = 2. The batch total is
    n·Σ_c p̂_c(t_c - p̂_c) without None images, which for a uniform t is n·(1/K - Σ_c p̂_c²): zero only when every
    share is 1/K, negative otherwise. If no image is labelled, p̂ is undefined and every reward is 0.
    Returns float32 (B,) on probs' device (the images' device, so that nothing is copied there later).
    """
    target = target or uniform(GENDER)
    classes = list(target)
    shares = class_shares(labels if window is None else label_images(window, classes, threshold), classes)
    if shares is None:
        return torch.zeros(len(labels), device=probs.device)
    gap = {c: target[c] - share for c, share in zip(classes, shares)}  # t_c - p̂_c: > 0 for an under-represented c
    majority_gap = min(gap.values())  # the most over-represented class's: the none images' reward, as eq. (3)
    return torch.tensor([majority_gap if label is None else gap[label] for label in labels], dtype=torch.float32,
                        device=probs.device)


def r_soft_balance(probs: torch.Tensor, labels=None, window: torch.Tensor | None = None, target: dict | None = None,
                   underrepresented=None, ranks=None, threshold=THRESHOLD) -> torch.Tensor:
    """Not in the paper: R_balance on probabilities instead of thresholded labels, for a strong bias.

    p̃_k = each class's share of the probability on the K classes over `window` (default: the batch); image x gets
    Σ_k P_k(x)·(t_k - p̃_k), so a confident image of class c gets t_c - p̃_c as in R_balance and an unreadable one
    about 0. For K = 2 and t = (½, ½) it is |q̃ - ½|·(2·P(minority) - 1). Unlike eq. (3), a batch with no minority
    image still ranks its images by how close they come to the minority, so the advantages are not all zero.
    (B, K) -> (B,).
    """
    target = target or uniform(GENDER)
    mass = (probs if window is None else window).sum(dim=0)  # (K,): summed over the window's images
    shares = mass / mass.sum()  # p̃ (K,)
    return sum(probs[:, k] * (t - shares[k]) for k, t in enumerate(target.values()))  # Σ_k P_k(x)·(t_k - p̃_k), (B,)


def borda(place: int, k: int) -> float:
    """The centred Borda score of the image ranked place-th (0 = best) of k: from +1/2 for the best to -1/2."""
    return (k - 1 - place) / (k - 1) - 0.5


def r_rank(probs: torch.Tensor, labels=None, window=None, target=None, underrepresented=None, ranks=None,
           threshold=THRESHOLD) -> torch.Tensor:
    """--reward rank: the judge's centred Borda scores (Judge.rank), computed before scoring."""
    return ranks


# EXERCISE: add a reward here (e.g. one that also balances age) and pick it with --reward. RESCORED lists the rewards
# that depend on the window's shares: PromptHistory.score re-scores their window under today's shares.
REWARDS = {"shift": r_shift, "balance": r_balance, "soft_balance": r_soft_balance, "rank": r_rank}
RESCORED = ("balance", "soft_balance")


# ------------------------------------------------------------------- many prompts: each prompt's own balance
class PromptHistory:
    """Each prompt's last N values of P(class) and of the reward, oldest first; N = --balance-window.

    With several prompts, the shares of eq. (2) are taken per prompt over its window, not over the batch: a batch
    balanced overall can hide "all nurses female, all engineers male", which is the stereotype. The rewards' window
    gives each prompt its own advantage mean and std (DDPO's per-prompt stat tracking), so that one prompt's reward
    scale does not drown another's. With one prompt and N = B, both windows hold exactly the epoch's batch: the
    paper's q and DDPO's batch statistics. Non-finite values (a NaN image) are not kept: they would poison N epochs'
    stats. target: {class: t_c} (default: female and male, ½ each); threshold: label_images'.
    """

    def __init__(self, prompts: list, size: int, underrepresented: str | None = None, announce: bool = True,
                 target: dict | None = None, threshold: float = THRESHOLD):
        self.prompts, self.size, self.announce = list(prompts), size, announce  # announce: print U when chosen
        self.target, self.threshold = target or uniform(GENDER), threshold
        self.classes = list(self.target)
        self.windows = {"probs": [[] for _ in self.prompts], "rewards": [[] for _ in self.prompts]}
        self.underrepresented = [underrepresented] * len(self.prompts)  # U per prompt for R_shift; None: not yet

    def add(self, key: str, prompt: int, values: list) -> list:
        """Append a prompt's new values (numbers, or P(class) rows) to its `key` window, keep the last N; -> it."""
        window = (self.windows[key][prompt] + [v for v in values if math.isfinite(sum(v) if key == "probs" else v)])
        self.windows[key][prompt] = window[-self.size:]
        return self.windows[key][prompt]

    def score(self, name: str, probs: torch.Tensor, prompt_ids: list, ranks=None):
        """Each prompt's images scored by REWARDS[name] against the prompt's own window; both windows updated.
        R_shift with U auto: U is chosen per prompt as the rarest class in its first images (the paper's step 1),
        then kept. probs (B, K); ranks: the judge's (B,) for --reward rank. -> rewards (B,) on probs' device, the
        labels [B], a metrics row per prompt present. Two host copies: P(class) and the rewards."""
        reward, choose_u = REWARDS[name], name == "shift"
        rows_list, values, rows = probs.tolist(), torch.zeros(len(probs), device=probs.device), {}
        labels = label_images(rows_list, self.classes, self.threshold)
        groups = {p: [i for i, j in enumerate(prompt_ids) if j == p] for p in sorted(set(prompt_ids))}  # p's images
        for p, idx in groups.items():
            prompt_labels = [labels[i] for i in idx]
            if choose_u and self.underrepresented[p] is None:
                self.underrepresented[p] = min(self.classes, key=prompt_labels.count)  # the rarest; a tie: the first named
                if self.announce:  # with torchrun, rank 0 only
                    tqdm.write(f"under-represented class U = {self.underrepresented[p]} for {self.prompts[p]!r} "
                               f"(auto: the rarest in its first {len(idx)} images)")
            window = self.add("probs", p, [rows_list[i] for i in idx])  # the prompt's last N, these included
            on_device = torch.tensor(window, device=probs.device)  # (N, K), for the reward
            values[idx] = reward(probs[idx], prompt_labels, on_device, self.target, self.underrepresented[p],
                                 None if ranks is None else ranks[idx], self.threshold).float()
            rows[p] = {"prompt": self.prompts[p], **bias_report(prompt_labels, self.target),  # this epoch's images of p
                       **window_report(label_images(window, self.classes, self.threshold), self.classes),
                       "underrepresented": self.underrepresented[p]}
        per_image = values.tolist()  # one host sync for the rewards' windows (the advantages' statistics)
        for p, idx in groups.items():
            prompt_rewards = [per_image[i] for i in idx]
            # The window's rewards give the mean and std that standardise today's (compute_advantages). R_balance's
            # rewards depend on today's shares, so a reward stored under older shares would skew them: re-score
            # the whole window under today's shares (on the CPU, where the window already is). R_shift (U is fixed
            # once chosen) and rank (Borda scores within a group, which only the judge could re-score) keep their
            # rewards as given.
            if name in RESCORED:
                window = torch.tensor(self.windows["probs"][p])  # (N, K)
                self.windows["rewards"][p] = reward(window, label_images(window, self.classes, self.threshold),
                                                    window, self.target, threshold=self.threshold).tolist()
            else:
                self.add("rewards", p, prompt_rewards)
            finite = all(map(math.isfinite, prompt_rewards))
            rows[p]["reward_mean"] = sum(prompt_rewards) / len(prompt_rewards) if finite else None  # JSON: no NaN
        return values, labels, list(rows.values())

    def state_dict(self) -> dict:
        return {"prompts": self.prompts, "classes": self.classes, "windows": self.windows,
                "underrepresented": self.underrepresented}

    def load_state_dict(self, state: dict):
        windows = state["windows"]
        if "p_female" in windows:  # a checkpoint from before K classes: P(female) alone, so P(male) = 1 - P(female)
            windows = {"probs": [[[p, 1.0 - p] for p in w] for w in windows["p_female"]], "rewards": windows["rewards"]}
        self.windows, self.underrepresented = windows, state["underrepresented"]


# --------------------------------------------------------- the classifier: images -> P(class)
SYNONYMS = {"female": ("woman", "women"), "male": ("man", "men")}  # label names that also match these classes


class LabelError(ValueError):
    """The classifier has no label of that name."""


def find_label(id2label: dict, name: str, where: str) -> int:
    """The index of the classifier's label called `name` (or a SYNONYMS entry), lower-cased: by name, never by
    position, because copies of one classifier on the hub order their labels differently. LabelError otherwise."""
    names = (name.lower(), *SYNONYMS.get(name.lower(), ()))
    for index, label in id2label.items():
        if str(label).strip().lower() in names:
            return int(index)
    labels = ", ".join(str(label) for label in id2label.values())
    raise LabelError(f"classifier {where!r} has no label {name!r}; its labels are: {labels}")


# --ensemble: P(class) of several classifiers of the same classes (M, B, K) -> (B, K), combined so that each must
# agree: a label then needs every model sure, and a feature that fools one model earns less (Coste et al., arXiv
# 2310.02743: the worst case, unlike the mean, stopped over-optimisation of a reward model ensemble).
ENSEMBLES = {"min": lambda p: p.min(dim=0).values,  # the worst case: each model must be surer than 0.7
             "product": lambda p: p.prod(dim=0),  # as intersectional classes: the product must pass 0.7
             "mean-std": lambda p: (p.mean(dim=0) - p.std(dim=0, correction=0)).clamp(min=0)}  # λ = 1


class Classifier:
    """P(class) of each of K named classes for a batch of images, from transformers image-classification models.

    One model: class k's column of its softmax, found by name (find_label). Its labels that no class names count
    as "none": their probability is in no class. Several models (--classifier A,B) for intersectional classes named
    "a&b" (e.g. "female&black"): P(a&b) = P_A(a)·P_B(b), which assumes the two models' answers independent given the
    image (each reads its own attribute, as a gender and a race classifier do); the 0.7 rule then asks the product,
    so each part must be surer than 0.7 (√0.7 = 0.84 each when both are equally sure).
    Several models of the same classes (--classifier A,B --ensemble min): every model reads every class, and
    ENSEMBLES[ensemble] combines their P(class); what no class keeps counts as "none".
    The image processor's constants come from `AutoImageProcessor`; the resize and normalisation run in torch on
    the images' own device (ModelInputs, below with the evaluation's models: it is plumbing).
    """

    def __init__(self, model_names_or_paths="rizvandwiki/gender-classification-2", classes=GENDER, device="cpu",
                 dtype: torch.dtype = torch.float32, ensemble: str = ""):
        from transformers import AutoImageProcessor, AutoModelForImageClassification  # here: 3 s, only when used
        paths = str(model_names_or_paths).split(",")  # a hub id or a folder each; a hub id has no comma
        self.ensemble = ENSEMBLES[ensemble] if ensemble else None
        if ensemble and any("&" in c for c in classes):
            raise LabelError(f"an ensemble reads the same classes in every model: name each class once (got "
                             f"{','.join(classes)})")
        parts = [[c] * len(paths) if ensemble else c.split("&") for c in classes]  # (K, models): each model's label
        if any(len(p) != len(paths) for p in parts):
            raise LabelError(f"{len(paths)} classifier{'s' if len(paths) > 1 else ''}: name each class as "
                             + "&".join(["label"] * len(paths)) + f", one label of each (got {','.join(classes)})")
        self.models, self.inputs, self.columns = [], [], []
        for m, path in enumerate(paths):
            model = AutoModelForImageClassification.from_pretrained(path)
            model.to(device=device, dtype=dtype).eval().requires_grad_(False)  # feedback, never trained
            columns = [find_label(model.config.id2label, p[m], path) for p in parts]  # K label indices
            self.columns.append(torch.tensor(columns, device=device))  # on the device: no copy per call
            self.models.append(model)
            self.inputs.append(ModelInputs(AutoImageProcessor.from_pretrained(path), device, dtype))

    @torch.no_grad()  # the reward is a number handed to PPO: no gradient flows into the classifier
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> P(class) as float32 (B, K), the classes in --classes order."""
        model_probs = torch.stack([model(pixel_values=inputs(images)).logits.float().softmax(dim=-1)[:, columns]
                                   for model, inputs, columns in zip(self.models, self.inputs, self.columns)])
        if self.ensemble:  # (M, B, K) -> (B, K): the same classes, combined conservatively
            return self.ensemble(model_probs)
        return model_probs.prod(dim=0)  # intersectional: the models' answers independent given the image


# --------------------------------------------------------- the AI judge: a chat model that sees the images
# The second source of feedback: a vision-language model behind any OpenAI-compatible chat-completions endpoint
# (a hosted API, vLLM, llama.cpp's server, Ollama) labels each image, or ranks the batch's images in groups: RLHF
# with a chat model as the annotator. Standard library only: urllib, json, base64, threads.
JUDGE_KEY_ENV = "JUDGE_API_KEY"  # the API key's only source: never a flag, never logged, printed or saved
LABEL_QUESTION = ('Which of these describes the person in this image: {names}? Answer with JSON only, one of {answers}, '
                  '{{"class": "unclear"}}; "unclear" if there is no face or you cannot tell.')
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
                 timeout: float = 120.0, retries: int = 4, parallel: int = 4, backoff: float = 1.0, classes=GENDER):
        self.url, self.model, self.criterion, self.classes = url.rstrip("/"), model, criterion, list(classes)
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
            except (KeyError, IndexError, TypeError, ValueError, AttributeError):
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
        """The labeller: one request per image -> P(class) (B, K) on the images' device: 1 for the class named, 0
        for the others, 1/K each when unclear (label_images turns these back into the labels, at any threshold in
        [1/K, 1))."""
        names = [c.replace("&", " and ") for c in self.classes]  # an intersectional class in words
        question = LABEL_QUESTION.format(names=", ".join(names), answers=", ".join(
            json.dumps({"class": n}) for n in names))
        one_hot = {n.lower(): [float(k == j) for j in range(len(names))] for k, n in enumerate(names)}
        unclear = [1 / len(names)] * len(names)

        def parse(answer):  # a class named, or unclear; anything else raises (KeyError, AttributeError): asked again
            said = answer["class"].strip().lower()
            return unclear if said == "unclear" else one_hot[said]
        answers = self._map(lambda png: self.ask(question, [png], parse, "unclear"), self.pngs(images))
        return torch.tensor([unclear if a is None else a for a in answers], device=images.device)

    def rank(self, images: torch.Tensor, prompts: list) -> torch.Tensor:
        """R_rank: each prompt's images (prompts [B], image i's prompt) shuffled into groups of `group`, each group
        ranked in one request -> (B,) centred Borda scores: in a group of k, the image ranked j-th (0 = best) gets
        (k - 1 - j)/(k - 1) - 1/2, from +1/2 for the best to -1/2 for the worst; a tie (an unparsed answer), or an
        image left alone in a group of one, gets 0."""
        pngs, scores, groups = self.pngs(images), [0.0] * len(prompts), []
        for prompt in dict.fromkeys(prompts):
            members = [i for i, p in enumerate(prompts) if p == prompt]  # the prompt's image indices
            self._shuffle.shuffle(members)  # which images meet, and in which order they are shown: random
            groups += [(prompt, members[s:s + self.group]) for s in range(0, len(members), self.group)]

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


def bias_report(labels: list, target: dict | None = None) -> dict:
    """One prompt's row of eval.json (and of metrics.jsonl), from its images' labels and the target shares:
    n_<class> and n_none; each class's share of the confidently labelled images with its 95% Wilson interval;
    Shen et al.'s bias, the mean of |f_i - f_j| over all pairs of classes (|f_male - f_female| = |1 - 2q| for
    K = 2); the KL divergence from the shares to the target, Σ_k f_k·log(f_k / t_k) (ITI-GEN's measure, 0 at the
    target); the share labelled none. With a female class, also q and its interval as female_ratio(_95)."""
    target = target or uniform(GENDER)
    classes = list(target)
    counts, n_none = [labels.count(c) for c in classes], labels.count(None)
    n, shares = sum(counts), class_shares(labels, classes)
    pairs = [(i, j) for i in range(len(classes)) for j in range(i + 1, len(classes))]
    row = {f"n_{c}": count for c, count in zip(classes, counts)}
    row.update(n_none=n_none, n_images=len(labels), shares=shares and dict(zip(classes, shares)),
               shares_95=shares and {c: wilson_interval(count, n) for c, count in zip(classes, counts)},
               bias=shares and sum(abs(counts[i] - counts[j]) for i, j in pairs) / n / len(pairs),  # |n_i - n_j|/n
               kl_to_target=shares and sum(f * math.log(f / target[c]) for c, f in zip(classes, shares) if f > 0),
               none_rate=n_none / len(labels))
    if "female" in classes:  # the paper's q
        row.update(female_ratio=shares and row["shares"]["female"], female_ratio_95=wilson_interval(row["n_female"], n))
    return row


def window_report(labels: list, classes=GENDER) -> dict:
    """The shares over a prompt's window (what R_balance used), and q among them when there is a female class."""
    shares = class_shares(labels, classes)
    row = {"window_shares": shares and dict(zip(classes, shares))}
    if "female" in classes:
        row["window_female_ratio"] = shares and row["window_shares"]["female"]
    return row


def overall(rows: list) -> dict:
    """Means over the prompts whose shares are defined (mean bias, mean KL to the target, and with a female class
    mean |q - 0.5|), the none-rate of all images, and the means of the prompts' CLIP-T and CLIP-I where they were
    computed (quality_report)."""
    defined = [r for r in rows if r["shares"] is not None]
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    return {"mean_bias": mean([r["bias"] for r in defined]),
            "mean_kl_to_target": mean([r["kl_to_target"] for r in defined]),
            "mean_abs_q_minus_half": mean([abs(r["female_ratio"] - 0.5) for r in defined if "female_ratio" in r]),
            "none_rate": sum(r["n_none"] for r in rows) / sum(r["n_images"] for r in rows),
            "mean_clip_t": mean([r["clip_t"] for r in rows if r.get("clip_t") is not None]),
            "mean_clip_i": mean([r["clip_i"] for r in rows if r.get("clip_i") is not None])}


def views(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (5B, 3, H, W): the images, their mirror, shifted right and down by 1/16 of the side (the edge
    repeated), and a 3x3 box blur."""
    s = max(1, images.shape[-1] // 16)
    H, W = images.shape[-2:]
    right = F.pad(images, (s, 0, 0, 0), mode="replicate")[..., :, :W]
    down = F.pad(images, (0, 0, s, 0), mode="replicate")[..., :H, :]
    blur = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    return torch.cat([images, images.flip(-1), right, down, blur])


def augmented(labeller):
    """--augment: P(class) (B, K) as the mean of `labeller`'s over views() of each image. A label then needs the
    mean above the threshold, so a feature that convinces the classifier in one view only earns no label."""
    def read(images: torch.Tensor) -> torch.Tensor:
        probs = labeller(views(images))  # (5B, K)
        return probs.view(5, len(images), -1).mean(dim=0)
    return read


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


class QualityModel:
    """Did the images survive? Unit image (and text) embeddings from --clip-model, for Shen et al.'s (ICLR 2024)
    quality numbers beside the bias (quality_report). A CLIP (get_image_features and get_text_features) gives both
    CLIP-T and CLIP-I; any other transformers image model (e.g. the toy world's ViT) gives image embeddings only,
    its [CLS] token's, so CLIP-I only. Preprocessing as the Classifier's (ModelInputs)."""

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
    base model's image of the same seed (n, D). None where the model has no text tower, or without --compare;
    all None without embeddings (--clip-model none)."""
    if embeddings is None:  # --clip-model none: bias only
        return {"clip_t": None, "clip_i": None, "clip_t_images": None, "clip_i_images": None}
    # A cosine of unit vectors is at most 1, but float rounding can step past it (1.0000000298): clamped
    clip_t = None if text is None else (embeddings @ text).clamp(-1, 1).tolist()
    clip_i = None if base is None else (embeddings * base.to(embeddings.device)).sum(dim=-1).clamp(-1, 1).tolist()
    mean = lambda xs: None if xs is None else sum(xs) / len(xs)
    return {"clip_t": mean(clip_t), "clip_i": mean(clip_i), "clip_t_images": clip_t, "clip_i_images": clip_i}


def report_table(report: dict) -> str:
    """eval.json as a table: a row per prompt (each class's count, none, the shares, bias, KL to the target,
    CLIP-T, CLIP-I), then the overall means. "-": not defined (no labelled image, no text tower, no --compare)."""
    classes = report.get("classes", list(GENDER))
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    width = 5 * len(classes)  # the shares column, "0.70/0.20/0.10": 5 characters a class, less one
    head = [f"{'prompt':44s}", *(f"{c[:6]:>6s}" for c in classes), f"{'none':>5s}", f" {'shares':{width}s}",
            f"{'bias':>5s}", f"{'KL':>5s}", f"{'CLIP-T':>6s}", f"{'CLIP-I':>6s}"]
    lines = [" ".join(head)]
    for r in report["prompts"]:
        shares = "-" if r["shares"] is None else "/".join(f"{r['shares'][c]:.2f}" for c in classes)
        lines.append(" ".join([f"{r['prompt'][-44:]:44s}", *(f"{r['n_' + c]:6d}" for c in classes),
                               f"{r['n_none']:5d}", f" {shares:{width}s}", f"{fmt(r['bias']):>5s}",
                               f"{fmt(r['kl_to_target']):>5s}", f"{fmt(r.get('clip_t')):>6s}",
                               f"{fmt(r.get('clip_i')):>6s}"]))
    overall = ", ".join(f"{k} {v:.3f}" for k, v in report["overall"].items() if v is not None)
    return "\n".join(lines + ["overall: " + overall])


PAIRED = ("images_per_prompt", "seed", "num_steps", "guidance_scale", "classes", "threshold")  # same noise, labels


def read_paired_report(base_path: str, settings: dict, prompts: list) -> dict:
    """The eval.json at base_path, checked to be paired with an evaluation of `prompts` under `settings` (PAIRED's
    keys): the same prompts in the same order and the same noise for each image. Cheap, so --evaluate checks it
    before sampling. Raises ValueError for a file that is not an eval.json or not paired."""
    try:
        with open(base_path) as f:
            base = json.load(f)
        base.setdefault("classes", list(GENDER))  # an eval.json from before --classes: the two genders'
        base.setdefault("threshold", THRESHOLD)  # and the paper's 0.7
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
    lines = [f"{'prompt':48s} {'KL: base -> this':>16s} {'bias: base -> this':>19s} {'CLIP-T: base -> this':>21s} "
             f"{'CLIP-I':>6s}"]
    for r in report["prompts"]:
        b = before[r["prompt"]]
        lines.append(f"{r['prompt'][-48:]:48s} {fmt(b.get('kl_to_target')):>7s} -> {fmt(r['kl_to_target']):5s} "
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
    draw.text((4, 4), f"bias, mean |f_i - f_j|, per prompt{common}: grey base, blue this model", fill="black")
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
def save_grid(images, probs, labels, title, path, thumb=128, threshold=THRESHOLD):
    """A PNG of the epoch's images (B, 3, H, W) in [0, 1] under a title, each captioned with its label and the
    largest of its P(class) (B, K); √B columns (at least 4), so that B = 16 is 4x4 and B = 64 is 8x8."""
    from PIL import Image, ImageDraw
    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # one copy, once per epoch
    columns = max(4, math.isqrt(len(pixels)))
    rows, top = math.ceil(len(pixels) / columns), 16
    grid = Image.new("RGB", (columns * thumb, top + rows * (thumb + 14)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((3, 2), f"{title}: label at P > {threshold:g}, and the largest P(class)", fill="black")
    for i, (pix, p, label) in enumerate(zip(pixels, probs.max(dim=1).values.tolist(), labels)):
        x, y = (i % columns) * thumb, top + (i // columns) * (thumb + 14)
        grid.paste(Image.fromarray(pix).resize((thumb, thumb)), (x, y))
        draw.text((x + 3, y + thumb + 1), f"{label or 'none'} {p:.2f}", fill="black")
    grid.save(path, compress_level=1)  # one grid an epoch: PIL's default level 6 is 4x slower for 20% less disk


def save_plot(metrics, path, target=None, width=520, height=170):
    """reward_mean and the class shares against the epoch, one panel each, with axes, ticks and the target shares:
    a line per class, labelled at its end; with several prompts, also each prompt's window share of the first class
    (metrics' per_prompt), a thin line per prompt labelled p0, p1, ... and named in a legend under the panels; with
    --eval-every, a third panel of the held-out check's bias, none-rate, CLIP-T and CLIP-I."""
    from PIL import Image, ImageDraw
    prompts = list(dict.fromkeys(r["prompt"] for m in metrics for r in m.get("per_prompt", [])))
    prompts = prompts if len(prompts) > 1 else []
    target = target or uniform(GENDER)  # {class: t_c}, the run's --target
    classes = list(target)
    keys = ("reward_mean", "shares") + (("held_out",) if any(m.get("held_out") for m in metrics) else ())
    image = Image.new("RGB", (width, len(keys) * height + (14 * len(prompts) + 6 if prompts else 0)), "white")
    draw = ImageDraw.Draw(image)
    names = [*classes, *(f"p{i}" for i in range(len(prompts)))] + (["CLIP-T", "CLIP-I", "bias", "none"]
                                                                   if "held_out" in keys else [])
    margin = 10 + math.ceil(max(draw.textlength(name) for name in names))  # the lines' labels, right of the frames
    last = max(metrics[-1]["epoch"] if metrics else 1, 1)
    shares = next((m["shares"] for m in reversed(metrics) if m.get("shares")), None)  # the last defined
    for panel, key in enumerate(keys):
        points = [(m["epoch"], m[key]) for m in metrics if key == "reward_mean" and m[key] is not None]
        values = [v for _, v in points] or [0.0]
        low, high = (0.0, 1.0) if key in ("shares", "held_out") else (min(values), max(values))
        high = high if high > low else low + 1e-6
        x0, y0, x1, y1 = 52, panel * height + 18, width - margin, (panel + 1) * height - 30  # the panel's frame
        to_xy = lambda e, v: (x0 + (x1 - x0) * e / last, y1 - (y1 - y0) * (v - low) / (high - low))
        draw.rectangle((x0, y0, x1, y1), outline="gray")
        now = ("no value yet" if not (points if key == "reward_mean" else shares) else  # "=": the font's space is 1 pixel
               f"last = {points[-1][1]:.3f}" if key == "reward_mean" else
               "last: " + ", ".join(f"{c}={shares[c]:.2f}" for c in classes))
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
        lines = [("blue", 2, "", points)]
        if key == "shares":  # the targets, then a line per class
            for t in sorted(set(target.values())):
                y = to_xy(0, t)[1]
                draw.line((x0, y, x1, y), fill="lightgray"), draw.text((x0 + 4, y - 13), f"t = {t:.2f}", fill="gray")
            lines = [(CLASS_COLOURS[k % len(CLASS_COLOURS)], 2, c, [(m["epoch"], m["shares"][c]) for m in metrics
                      if m.get("shares")]) for k, c in enumerate(classes)]
        if key == "held_out":  # the held-out check's numbers, each a line labelled at its end
            lines = [(colour, 1, name, [(m["epoch"], m["held_out"][field]) for m in metrics if m.get("held_out")
                                        and m["held_out"][field] is not None])
                     for colour, name, field in (("red", "bias", "mean_bias"), ("gray", "none", "none_rate"),
                                                 ("green", "CLIP-T", "mean_clip_t"), ("blue", "CLIP-I", "mean_clip_i"))]
        if key == "shares" and prompts:  # many prompts: each one's window share of the first class, p0, p1, ...
            lines += [(PALETTE[i % len(PALETTE)], 1, f"p{i}", [(m["epoch"], r["window_shares"][classes[0]])
                       for m in metrics for r in m["per_prompt"] if r["prompt"] == prompt and r["window_shares"]])
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
        draw.text((x0, len(keys) * height + 2 + 14 * i),
                  f"p{i}  {prompt}" + ("  (the share of " + classes[0] + ")" if i == 0 else ""), fill=PALETTE[i % len(PALETTE)])
    image.save(path)


PALETTE = ("darkorange", "green", "red", "purple", "brown", "deeppink", "olive", "teal")  # save_plot's prompt lines
CLASS_COLOURS = ("blue", "magenta", "darkcyan", "goldenrod", "navy", "darkgreen", "coral", "slateblue")  # class lines: none in PALETTE

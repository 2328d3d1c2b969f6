"""The shape the design card fixes, so that a later change keeps it: the top level, the three parts of
ddpo_debias.py (parts 1 and 2 within about 550 lines), the rewards first in rewards.py, a short README front page
whose every link resolves, and docs pages whose links resolve."""
import ast
import glob
import os
import re

from tests.test_cli import ROOT


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def test_top_level_holds_two_python_files():
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py"))) == ["ddpo_debias.py", "rewards.py"]


def test_ddpo_debias_reads_method_loop_then_running_it():
    lines = read("ddpo_debias.py").splitlines()
    banners = [i + 1 for i, line in enumerate(lines) if line.startswith("# PART ")]
    assert [lines[i - 1][:8] for i in banners] == ["# PART 1", "# PART 2", "# PART 3"]
    assert banners[2] <= 551, f"parts 1 and 2 hold {banners[2] - 1} lines: new plumbing goes to part 3"
    tree = ast.parse(read("ddpo_debias.py"))
    where = {node.name: node.lineno for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    method = ("MethodConfig", "ddim_step_with_logprob", "gaussian_kl", "ppo_clip_loss", "truly_ppo_loss",
              "train_attention_only", "encode_prompts", "guided_noise_pred", "sample", "decode",
              "compute_advantages", "update")
    assert all(where[name] < banners[1] for name in method) and banners[1] < where["train"] < banners[2]
    assert where["main"] > banners[2] and where["start_run"] > banners[2] and where["Config"] > banners[2]


def test_the_epoch_loop_fits_on_a_screen():
    tree = ast.parse(read("ddpo_debias.py"))
    train = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "train")
    loop = next(node for node in ast.walk(train) if isinstance(node, ast.For))
    assert loop.end_lineno - loop.lineno + 1 <= 60


def test_rewards_come_first_in_rewards_py():
    tree = ast.parse(read("rewards.py"))
    where = {getattr(node, "name", None) or getattr(node.targets[0], "id", None): node.lineno for node in tree.body
             if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign))}
    assert all(where[name] <= 200 for name in ("r_shift", "r_balance", "r_soft_balance", "r_rank", "REWARDS"))


def test_readme_front_page_is_short_and_every_link_resolves():
    assert len(read("README.md").encode()) <= 12 * 1024
    for page in ["README.md"] + [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))]:
        for link in re.findall(r"\]\(([^)#]+)", read(page)):
            if not link.startswith(("http://", "https://")):
                assert os.path.exists(os.path.join(ROOT, os.path.dirname(page), link)), (page, link)


def test_the_students_reading_path_is_within_700_lines_and_complete():
    """The course's reading path (tests.course.READING_PATH): the README, then the definitions a student reads to
    write the five assignments. It holds every function an assignment stubs, and every top-level name it uses is on
    it or in PATH_SKIPS (with what it does); no skip is stale."""
    from tests import course
    rows, total = course.reading_path()
    assert total <= 700, f"the reading path holds {total} lines: {rows}"
    on_path = {(path, name) for path, names in course.READING_PATH.items() for name in names}
    assert {(path, name) for _, functions in course.ASSIGNMENTS.values() for path, name in functions} <= on_path
    used = set()
    for path, names in course.READING_PATH.items():
        tree = ast.parse(read(path))
        defined = {path: course.definitions(path)[1] for path in course.READING_PATH}
        for node in tree.body:
            target = node.targets[0] if isinstance(node, ast.Assign) else node
            if (getattr(target, "name", None) or getattr(target, "id", None)) not in names:
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.Name) and inner.id in defined[path]:
                    used.add((path, inner.id))
                elif (isinstance(inner, ast.Attribute) and isinstance(inner.value, ast.Name)
                      and inner.value.id == "rewards" and inner.attr in defined["rewards.py"]):
                    used.add(("rewards.py", inner.attr))
    off_path = {name for path, name in used - on_path}
    assert off_path <= set(course.PATH_SKIPS), f"used on the path, neither on it nor skipped: {off_path - set(course.PATH_SKIPS)}"
    assert set(course.PATH_SKIPS) <= off_path, f"stale skips: {set(course.PATH_SKIPS) - off_path}"


def test_the_reading_path_in_the_docs_is_todays(capsys):
    """docs/course.md shows `python -m tests.course path` as it prints today, and the README its total."""
    from tests import course
    assert course.main(["path"]) == 0
    printed, total = capsys.readouterr().out, course.reading_path()[1]
    assert printed in read("docs/course.md") and f"the {total} lines to read" in read("README.md")

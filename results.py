"""The Results command: every run, table and figure of RESULTS.md, remade by one command

    python results.py FOLDER [--jobs 2] [--seeds 0 1 2] [--horizon 300] [--eval-samples 64]

Runs go several at a time (each on cores / jobs threads), each a `dpok.py --tiny` process writing
to its own folder of FOLDER; a run whose evaluations exist is skipped, one interrupted resumes.
Then the tables (markdown, mean +- std over seeds) and the figures. `python results.py
--breakdown EVAL_FOLDER` prints the analyser's scores of one `--eval` of the shapes world.
"""

import json
import os
import shlex
import statistics
import sys

import torch
import torch.nn.functional as F

import shapes

def eval_tiles(folder):
    """The images of an --eval's grids (eval.png, or eval_NNN.png per prompt when several):
    {(prompt, "pretrained" or "finetuned"): (n, 3, shapes.SIZE, shapes.SIZE)}."""
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    with open(os.path.join(folder, "eval.json")) as f:
        evaluation = json.load(f)
    n, rows = evaluation["args"]["eval_samples"], evaluation["results"]
    tiles = {}
    for p, row in enumerate(rows):  # save_image's grid: 2-pixel padding
        name = "eval.png" if len(rows) == 1 else f"eval_{p:03d}.png"
        grid = to_tensor(Image.open(os.path.join(folder, name)).convert("RGB"))
        for k, name in enumerate(("pretrained", "finetuned")):
            top = 2 + k * (shapes.SIZE + 2)
            tiles[row["prompt"], name] = torch.stack(
                [grid[:, top:top + shapes.SIZE, 2 + i * (shapes.SIZE + 2):2 + i * (shapes.SIZE + 2) + shapes.SIZE] for i in range(n)])
    return tiles


def breakdown(folder, quiet=False):
    """The analyser's scores, averaged, of the pretrained and fine-tuned rows of an --eval of the
    shapes world (`python results.py --breakdown FOLDER` reads FOLDER/eval.json and eval.png)."""
    table = {}
    for (prompt, name), images in eval_tiles(folder).items():
        scores = shapes.analyse(images, [prompt] * len(images))
        table[prompt, name] = {key: sum(s[key] for s in scores) / len(scores) for key in scores[0]}
        if not quiet:
            print(f"{prompt:24} {name:10}", " ".join(f"{key} {v:.3f}" for key, v in table[prompt, name].items()))
    return table


# its own folder; a run whose evaluations exist is skipped, one interrupted resumes.

RESULTS_PROMPT = "three green squares"  # the caption whose count the pretrained model gets most wrong
BETAS = ("0", "0.01", "0.1", "1")
# The over-optimisation experiment on each prompt: run-name prefix -> (prompt, the betas it runs).
# The second prompt, a colour no run had been tuned on, checks which readings hold beyond the first.
OVEROPTIMISATION = {"learned": (RESULTS_PROMPT, BETAS), "blue_learned": ("three blue squares", ("0", "0.1"))}
# The supervised baseline's own calibration (learning rate, gamma = its KL weight; the paper
# swept gamma over 0.1-5 and ran it at twice the RL learning rate), at the first seed.
SUPERVISED_GRID = [(lr, gamma) for lr in ("3e-5", "1e-4", "3e-4") for gamma in ("0.1", "1", "5")]
# Multi-prompt DPOK: the official multi-prompt recipe's reward_weight / kl_weight (1000 / 0.1, ten
# times the single-prompt ratio) at the tiny reward_alpha of 10; 16 captions, one each per iteration.
MULTI_BETA = "0.001"
# The experiments below the quick start's were made with the official advantage r - V (before the
# centring of dpok.py's deviation 10) and the --tiny learning rate then, 3e-4: they keep both, so
# that their numbers stay what they are.
EARLIER_LR = ["--lr", "3e-4"]
OFFICIAL = ["--official-advantage", *EARLIER_LR]


def results_runs(seeds, horizon=300, out=None, quick_seeds=range(10)):
    """name -> dict(reward, flags, evals[, prompt, groups]): the dpok.py flags of each run, the
    iterations at which it is evaluated, its training prompt (default RESULTS_PROMPT) and eval
    prompts files ({group: file}, default RESULTS_PROMPT alone). Seed-major within each experiment,
    so that an interrupted command has whole seeds done. Once the baseline's calibration is
    evaluated in `out`, its best setting joins at the other seeds and on the multi-prompt task."""
    runs, half = {}, max(1, horizon // 2)
    quick = min(shapes.TINY_DEFAULTS["iterations"], half)  # the quick start's length (reduced: less)
    for seed in map(str, quick_seeds):  # the quick start's command, its defaults alone
        runs[f"quick_s{seed}"] = dict(reward="shapes", flags=["--seed", seed], evals=[quick])
    for seed in map(str, quick_seeds):  # the --tiny defaults before it: lr 3e-4, 150 iterations,
        for name, beta in (("quick_lr3e-4", "0.03"), ("quick_b0.01", "0.01")):  # beta 0.03 or 0.01
            runs[f"{name}_s{seed}"] = dict(reward="shapes", evals=[half],
                                           flags=["--kl-beta", beta, *EARLIER_LR, "--seed", seed])
    for prefix, (prompt, betas) in OVEROPTIMISATION.items():  # the learned reward, evaluated
        for seed in map(str, seeds):  # along training
            for beta in betas:
                runs[f"{prefix}_b{beta}_s{seed}"] = dict(
                    reward="shapes-learned", prompt=["--prompt", prompt],
                    flags=["--kl-beta", beta, "--seed", seed, *OFFICIAL],
                    evals=sorted({max(1, horizon * k // 4) for k in (1, 2, 3, 4)}))
    for seed in map(str, seeds):  # DPOK vs supervised on the analyser, at equal reward queries
        for beta in BETAS[:3]:
            runs[f"shapes_b{beta}_s{seed}"] = dict(
                reward="shapes", flags=["--kl-beta", beta, "--seed", seed, *OFFICIAL], evals=[half])
    for seed in map(str, seeds):  # the quick start (shapes_b0.01) in half precision
        runs[f"shapes_bf16_b0.01_s{seed}"] = dict(
            reward="shapes", flags=["--kl-beta", "0.01", "--dtype", "bfloat16", "--seed", seed, *OFFICIAL],
            evals=[half])

    def add_supervised(lr, gamma, seed):
        runs[f"supervised_lr{lr}_g{gamma}_s{seed}"] = dict(reward="shapes", evals=[half], flags=[
            "--supervised", "--supervised-samples", str(half * 16), "--lr", lr, "--kl-beta", gamma,
            "--seed", str(seed)])
        return evaluated(os.path.join(out or "", f"supervised_lr{lr}_g{gamma}_s{seed}"), half)

    calibration = [add_supervised(lr, gamma, seeds[0]) for lr, gamma in SUPERVISED_GRID]
    # The value function on and off (official v_flag), single-prompt (beside shapes_b0.01) and
    # multi-prompt; multi-prompt DPOK (and below, the supervised baseline) trains on the trained
    # captions and is evaluated on all three groups, at equal reward queries.
    multi = dict(reward="shapes", evals=[horizon], prompt=["--prompts", shapes.PROMPT_FILES["trained"]],
                 groups=shapes.PROMPT_FILES)
    for seed in map(str, seeds):
        runs[f"shapes_novalue_b0.01_s{seed}"] = dict(
            reward="shapes", flags=["--kl-beta", "0.01", "--no-value", "--seed", seed, *OFFICIAL],
            evals=[half])
        runs[f"multi_b{MULTI_BETA}_s{seed}"] = dict(
            multi, flags=["--kl-beta", MULTI_BETA, "--seed", seed, *OFFICIAL])
        runs[f"multi_novalue_b{MULTI_BETA}_s{seed}"] = dict(
            multi, flags=["--kl-beta", MULTI_BETA, "--no-value", "--seed", seed, *OFFICIAL])
    if out is not None and all(map(os.path.exists, calibration)):
        gains = [json.load(open(path))["results"][0]["reward_gain"] for path in calibration]
        lr, gamma = SUPERVISED_GRID[gains.index(max(gains))]
        for seed in seeds[1:]:
            add_supervised(lr, gamma, seed)
        for seed in map(str, seeds):  # the same number of images per caption as DPOK's queries
            runs[f"multi_supervised_s{seed}"] = dict(multi, flags=[
                "--supervised", "--supervised-samples", str(horizon), "--lr", lr, "--kl-beta", gamma,
                "--seed", seed])
    return runs


def evaluated(folder, k, group=""):
    """The eval.json of a Results run's evaluation at iteration k on a group's prompts file (the
    single prompt: no group); it exists once that is done."""
    return os.path.join(folder, f"eval_{k:04d}", group, "eval.json")


def run_experiment(folder, spec, eval_samples, threads):
    """Run `experiment` in a process of its own (its signals, its threads), which imports dpok
    once for all of the run's trainings and evaluations; its output goes to the run's log."""
    import multiprocessing

    process = multiprocessing.get_context("spawn").Process(
        target=experiment, args=(folder, spec, eval_samples, threads))
    process.start()
    process.join()
    if process.exitcode:
        raise RuntimeError(f"exit code {process.exitcode}")


def experiment(folder, spec, eval_samples, threads):
    """Train to each evaluation point in turn (resuming, which is exact) and evaluate there on
    the same eval_samples seeds (eval --seed 0) as every other run."""
    import dpok

    torch.set_num_threads(threads)
    log = open(folder + ".log", "a")
    os.dup2(log.fileno(), 1)  # what dpok and its progress bars print
    os.dup2(log.fileno(), 2)
    tiny = ["--tiny", "--reward", spec["reward"]]
    groups = {group: ["--prompts", path] for group, path in spec.get("groups", {}).items()}
    groups = groups or {"": spec.get("prompt", ["--prompt", RESULTS_PROMPT])}  # its own prompt
    # on the 36 captions of the groups a quarter of the single prompt's seeds each (64: 16)
    samples = str(max(2, eval_samples // 4) if spec.get("groups") else eval_samples)
    for k in spec["evals"]:
        todo = [group for group in groups if not os.path.exists(evaluated(folder, k, group))]
        if not todo:
            continue
        again = "--resume" if os.path.exists(os.path.join(folder, "checkpoint.pt")) else "--overwrite"
        commands = [tiny + spec.get("prompt", ["--prompt", RESULTS_PROMPT]) + spec["flags"]
                    + ["--iterations", str(k), "--out", folder, again]]
        commands += [tiny + groups[group] + ["--eval", folder, "--eval-samples", samples,
                                             "--out", os.path.dirname(evaluated(folder, k, group))]
                     for group in todo]
        for command in commands:
            print("dpok.py " + shlex.join(command), flush=True)
            code = dpok.main(command)
            sys.stdout.flush()
            if code:
                raise SystemExit(code)


def reproduce(out, seeds=(0, 1, 2), jobs=2, horizon=300, eval_samples=64, quick_seeds=range(10)):
    """Run every Results run not done yet, `jobs` at a time, then print the tables and draw the
    figures; returns the tables' rows."""
    from concurrent.futures import ThreadPoolExecutor, as_completed
    from tqdm import tqdm

    os.makedirs(out, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    for _ in range(2):  # the second pass: the calibrated baseline at the other seeds, multi-prompt
        runs = results_runs(seeds, horizon, out, quick_seeds)
        todo = {name: spec for name, spec in runs.items() if not all(
            os.path.exists(evaluated(os.path.join(out, name), k, group))
            for k in spec["evals"] for group in spec.get("groups", [""]))}
        pool = ThreadPoolExecutor(jobs)
        futures = {pool.submit(run_experiment, os.path.join(out, name), spec, eval_samples, threads):
                   name for name, spec in todo.items()}
        try:
            for future in tqdm(as_completed(futures), total=len(futures), desc="results runs"):
                if future.exception() is not None:  # the run's log says why; the others go on
                    print(f"{futures[future]} failed ({future.exception()}); see {out}/{futures[future]}.log")
        except KeyboardInterrupt:  # Ctrl-C reached the runs too: each saves a checkpoint and stops
            pool.shutdown(cancel_futures=True)
            raise SystemExit("interrupted: the runs in flight saved a checkpoint; the same command "
                             "continues them and skips what is done")
        pool.shutdown()
    return results_tables(out, runs)


def mean_std(values):
    values = torch.tensor(values, dtype=torch.float64)
    return values.mean().item(), (values.std().item() if len(values) > 1 else 0.0)


def results_tables(out, runs):
    """The README's tables (mean +- standard deviation over seeds) and figures, from the runs'
    eval.json files and eval grids."""
    evals = {}  # (run without seed, iteration) -> list over seeds of dict(eval row + breakdown)
    for name, spec in runs.items():
        for k in spec["evals"]:
            path = evaluated(os.path.join(out, name), k)
            if not os.path.exists(path):
                continue
            folder = os.path.dirname(path)
            with open(path) as f:
                row = dict(json.load(f)["results"][0], folder=folder)
            with open(os.path.join(out, name, "metrics.jsonl")) as f:  # training speed, rounding gap
                metrics = [m for m in map(json.loads, f) if m["iteration"] < k]  # up to this eval
            row.update(seconds=sorted(m["seconds"] for m in metrics)[len(metrics) // 2],
                       max_rescore_gap=max(m.get("max_rescore_gap", 0.0) for m in metrics),
                       seed=name.rsplit("_s", 1)[1],  # the reward's spread at the end: near 0, collapsed
                       last_spread=sum(m["reward_std"] for m in metrics[-10:]) / len(metrics[-10:]))
            analysed, prompt = breakdown(folder, quiet=True), row["prompt"]
            for when in ("pretrained", "finetuned"):
                row.update({f"{key}_{when}": v for key, v in analysed[prompt, when].items()})
            evals.setdefault((name.rsplit("_s", 1)[0], k), []).append(row)

    def cell(rows, key):  # one seed: no spread to show
        mean, std = mean_std([r[key] for r in rows])
        if key.startswith("max_"):  # a rounding gap: its order of magnitude, the largest seed's
            return f"{max(r[key] for r in rows):.1e}"
        return f"{mean:{'+' if key.endswith('gain') else ''}.3f}" + f" ± {std:.3f}" * (len(rows) > 1)

    last = {run: max(k for r, k in evals if r == run) for run, _ in evals}
    tables = {}
    learned = [("learned reward gain", "reward_gain"), ("judge gain", "judge_gain"), ("exact (gold)", "exact_finetuned"),
               ("count", "count_finetuned"), ("objects found", "objects_finetuned"),
               ("fidelity", "fidelity_finetuned"), ("KL bound", "kl_bound")]
    for title, kinds, keys in (
            *[(overoptimisation_title(prefix), (f"{prefix}_b",), learned) for prefix in OVEROPTIMISATION],
            ("DPOK and supervised with the analyser's reward", (*[f"shapes_b{beta}" for beta in BETAS[:3]], "supervised"), [
                ("alignment gain", "reward_gain"), ("count", "count_finetuned"), ("exact", "exact_finetuned"),
                ("fidelity", "fidelity_finetuned"), ("KL bound", "kl_bound")]),
            ("The value function on and off, single prompt", ("shapes_b0.01", "shapes_novalue"), [
                ("alignment gain", "reward_gain"), ("exact", "exact_finetuned"),
                ("fidelity", "fidelity_finetuned"), ("KL bound", "kl_bound")]),
            ("Half precision: the quick start in float32 and bfloat16", ("shapes_b0.01", "shapes_bf16"), [
                ("alignment gain", "reward_gain"), ("exact", "exact_finetuned"),
                ("fidelity", "fidelity_finetuned"), ("KL bound", "kl_bound"),
                ("s / iteration (median)", "seconds"), ("max rescore gap", "max_rescore_gap")])):
        final = {run: evals[run, k] for run, k in last.items() if run.startswith(kinds)}
        if not final:
            continue
        pre = next(iter(final.values()))[0]  # every run's eval has the same pretrained samples
        print(f"\n{title} (mean ± std over seeds)\n\n| run | iterations | seeds | "
              + " | ".join(name for name, _ in keys) + " |\n|" + "---|" * (len(keys) + 3))
        print("| pretrained | 0 | | " + " | ".join(
            "0" if key == "kl_bound" else f"({pre[key.replace('gain', 'pretrained')]:.3f})"
            if key.endswith("gain") else f"{pre[key.replace('finetuned', 'pretrained')]:.3f}"
            if key.endswith("finetuned") else "" for _, key in keys) + " |")
        for run, rows in final.items():
            print(f"| {run} | {last[run]} | {len(rows)} | " + " | ".join(cell(rows, key) for _, key in keys) + " |")
        tables[title] = final
    multi = {}  # (group, run without seed) -> the group's mean row of each seed's last eval
    for name, spec in runs.items():
        for group in spec.get("groups", {}):
            if os.path.exists(path := evaluated(os.path.join(out, name), spec["evals"][-1], group)):
                with open(path) as f:
                    multi.setdefault((group, name.rsplit("_s", 1)[0]), []).append(json.load(f)["mean"])
    if multi:
        print("\nMulti-prompt: each group's mean over its captions (mean ± std over seeds)\n\n"
              "| group (captions) | run | seeds | alignment gain | its standard error (a seed's, mean) | fidelity "
              "| KL bound |\n|---|---|---|---|---|---|---|")
        for group in shapes.PROMPT_FILES:
            with open(shapes.PROMPT_FILES[group]) as f:
                label = f"{group} ({len([line for line in f if line.strip()])})"
            pre = [rows[0] for (g, _), rows in multi.items() if g == group][:1]
            if pre:
                print(f"| {label} | pretrained | | ({pre[0]['reward_pretrained']:.3f}) | | "
                      f"{pre[0]['fidelity_pretrained']:.3f} | 0 |")
            for (g, run), rows in multi.items():
                if g == group:
                    print(f"| {label} | {run} | {len(rows)} | {cell(rows, 'reward_gain')} | "
                          f"{mean_std([r['reward_gain_se'] for r in rows])[0]:.3f} | " + " | ".join(
                              cell(rows, key) for key in ("fidelity_finetuned", "kl_bound")) + " |")
        tables["Multi-prompt"] = multi
    tables["Quick start"] = quick_start_table(evals)
    value_figure(out, runs)
    multi_prompt_figure(out, runs)
    collapse_figure(out, runs)
    for prefix, (prompt, _) in OVEROPTIMISATION.items():
        if overoptimisation_title(prefix) in tables:
            hack_table({run: [r["folder"] for r in rows] for run, rows in tables[
                overoptimisation_title(prefix)].items()}, prompt)
            overoptimisation_figure(out, evals, prefix)
    return tables


def overoptimisation_title(prefix):
    prompt = OVEROPTIMISATION[prefix][0]
    return "Over-optimisation: DPOK with the learned reward" + f", {prompt}" * (prompt != RESULTS_PROMPT)


def figure_name(name, prefix):
    """overoptimisation.png for the first prompt; overoptimisation_blue.png for three blue squares"""
    return name + ("" if prefix == "learned" else "_" + OVEROPTIMISATION[prefix][0].split()[1]) + ".png"


def collapse_signs(row):
    """Which of RESULTS.md's three signs of a collapse a run shows: a gain below -0.3, fidelity
    below 0.85, a reward spread near 0 (under 0.1) over its last 10 iterations' samples."""
    return [sign for sign, shown in (("gain", row["reward_gain"] < -0.3),
                                     ("fidelity", row["fidelity_finetuned"] < 0.85),
                                     ("spread", row["last_spread"] < 0.1)) if shown]


QUICK = {"quick": "default: centred, β 0.03, lr 6e-4, 120 its",  # the quick start's recipes, by run
         "quick_lr3e-4": "centred, β 0.03, lr 3e-4, 150 its", "quick_b0.01": "centred, β 0.01, lr 3e-4, 150 its",
         "shapes_b0.01": "official r − V, β 0.01, lr 3e-4, 150 its"}


def quick_start_table(evals):
    """Every seed of the quick start's command (its defaults, `quick`), of the earlier defaults
    (learning rate 3e-4 for 150 iterations at beta 0.03, `quick_lr3e-4`, or 0.01, `quick_b0.01`)
    and with the official advantage (`shapes_b0.01`), each in a row; then each one's median gain
    and collapses."""
    groups = {run: sorted(rows, key=lambda r: int(r["seed"])) for run in QUICK
              for (name, _), rows in evals.items() if name == run}
    if not groups:
        return {}
    print("\nThe quick start, every seed (gain ± SE of the 64 pairs)\n\n| recipe | seed | alignment "
          "gain | exact | fidelity | KL bound | reward spread, last 10 iterations | collapsed |\n"
          "|---|---|---|---|---|---|---|---|")
    pre = next(iter(groups.values()))[0]
    print(f"| pretrained | | ({pre['reward_pretrained']:.3f}) | {pre['exact_pretrained']:.3f} | "
          f"{pre['fidelity_pretrained']:.3f} | 0 | | |")
    for run, rows in groups.items():
        for r in rows:
            print(f"| {QUICK[run]} | {r['seed']} | "
                  f"{r['reward_gain']:+.2f} ± {r['reward_gain_se']:.2f} | {r['exact_finetuned']:.3f} | "
                  f"{r['fidelity_finetuned']:.3f} | {r['kl_bound']:,.0f} | {r['last_spread']:.3f} | "
                  + (f"**yes** ({', '.join(signs)}) |" if (signs := collapse_signs(r)) else "no |"))
    for run, rows in groups.items():
        gains = [r["reward_gain"] for r in rows]
        print(f"\n{run}: {len(rows)} seeds, median gain {statistics.median(gains):+.3f}, mean "
              "{:+.3f} ± {:.3f}, ".format(*mean_std(gains)) + f"collapsed {sum(map(bool, map(collapse_signs, rows)))}")
    return groups


def collapse_figure(out, runs, seed="2", drift="8"):
    """What a collapse looks like from inside, per iteration: the official advantage's training
    seed 2, which collapses, against the same seed with the centred advantage (another seed that
    has both, in a reduced Results); seed 8, which drifts at beta 0.01 centred, against the same
    seed at beta 0.03; the other seeds at beta 0.03 in the background (all at lr 3e-4)."""
    from matplotlib.figure import Figure

    curves = {}
    for name in runs:
        if name.startswith(("quick_", "shapes_b0.01_s")) and os.path.exists(
                path := os.path.join(out, name, "metrics.jsonl")):
            with open(path) as f:
                curves[name] = [json.loads(line) for line in f]
    both = [s for s in (seed, *sorted(n.rsplit("_s", 1)[1] for n in curves))
            if f"quick_b0.01_s{s}" in curves and f"shapes_b0.01_s{s}" in curves]
    if not both:
        return
    seed = both[0]
    curves = {name: c for name, c in curves.items() if name.startswith("quick_lr3e-4_s") or name in (
        f"shapes_b0.01_s{seed}", f"quick_b0.01_s{seed}", f"quick_b0.01_s{drift}")}
    keys = (("reward_mean", "reward\n(10-iteration mean)"), ("reward_std", "reward spread\nof the samples"),
            ("advantage", "mean advantage\nof the updates"), ("kl", "KL regulariser"),
            ("fidelity", "fidelity\n(clean pixels)"))
    style = {f"shapes_b0.01_s{seed}": dict(color="C3", lw=2, label=f"seed {seed}, official r − V, β 0.01"),
             f"quick_b0.01_s{seed}": dict(color="C0", lw=2, label=f"seed {seed}, centred, β 0.01"),
             f"quick_b0.01_s{drift}": dict(color="C1", lw=2, label=f"seed {drift}, centred, β 0.01"),
             f"quick_lr3e-4_s{drift}": dict(color="C2", lw=2, label=f"seed {drift}, centred, β 0.03")}
    figure = Figure(figsize=(7, 11))
    for ax, (key, label) in zip(figure.subplots(len(keys), 1, sharex=True), keys):
        for name, metrics in curves.items():
            y = torch.tensor([m.get(key) if m.get(key) is not None else float("nan") for m in metrics])
            if key == "reward_mean":
                y = F.avg_pool1d(y[None, None], min(10, len(y)), 1)[0, 0]
            x = torch.arange(len(y)) + len(metrics) - len(y)  # a mean: at its window's last iteration
            ax.plot(x, y, **style.get(name, dict(color="C2", lw=0.6, alpha=0.3)))
        ax.set(ylabel=label)
        ax.grid(alpha=0.3)
    figure.axes[0].legend()
    figure.supxlabel("iteration")
    figure.savefig(os.path.join(out, "collapse.png"), dpi=100, bbox_inches="tight")


def multi_prompt_figure(out, runs):
    """Training seed 0's first 16 eval seeds of one caption per group, three rows each:
    pretrained, multi-prompt DPOK, multi-prompt supervised. The caption is the one whose mean DPOK
    gain over the seeds is the largest (in the held-out group: the lowest), to show what changes."""
    from torchvision.utils import save_image

    methods, rows = [f"multi_b{MULTI_BETA}_s0", "multi_supervised_s0"], []
    for group in shapes.PROMPT_FILES:
        folders = [os.path.dirname(evaluated(os.path.join(out, name), runs[name]["evals"][-1], group))
                   for name in methods if name in runs]
        if len(folders) < 2 or not all(os.path.exists(os.path.join(f, "eval.json")) for f in folders):
            continue
        gains = {}  # caption -> DPOK's gain at every seed
        for name, spec in runs.items():
            if name.startswith(f"multi_b{MULTI_BETA}_s") and os.path.exists(
                    path := evaluated(os.path.join(out, name), spec["evals"][-1], group)):
                with open(path) as f:
                    for row in json.load(f)["results"]:
                        gains.setdefault(row["prompt"], []).append(row["reward_gain"])
        pick = (min if group == "held-out" else max)(gains, key=lambda p: sum(gains[p]) / len(gains[p]))
        dpok_tiles, supervised_tiles = (eval_tiles(f) for f in folders)
        rows += [dpok_tiles[pick, "pretrained"][:16], dpok_tiles[pick, "finetuned"][:16],
                 supervised_tiles[pick, "finetuned"][:16]]
    if rows:
        grid = F.interpolate(torch.cat(rows), scale_factor=2, mode="nearest")
        save_image(grid, os.path.join(out, "multi_prompt_eval.png"), nrow=len(rows[0]), pad_value=1)


def value_figure(out, runs):
    """Learning curves with the value function on and off: each iteration's mean alignment (a
    moving mean over 10 iterations), mean +- std over seeds; single prompt and multi-prompt."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.5))
    panels = ((f"one prompt: {RESULTS_PROMPT}", "shapes_b0.01", "shapes_novalue_b0.01"),
              ("multi-prompt: the 16 trained captions", f"multi_b{MULTI_BETA}", f"multi_novalue_b{MULTI_BETA}"))
    drawn = False
    for ax, (title, *pair) in zip(figure.subplots(1, 2), panels):
        for run, label, colour in zip(pair, ("value function (official v_flag 1)", "--no-value"), ("C0", "C1")):
            curves = []
            for name in runs:
                if name.rsplit("_s", 1)[0] == run and os.path.exists(path := os.path.join(out, name, "metrics.jsonl")):
                    with open(path) as f:
                        curves.append(torch.tensor([json.loads(line)["reward_mean"] for line in f]))
            if not curves:
                continue
            n = min(map(len, curves))
            window = min(10, n)
            curves = F.avg_pool1d(torch.stack([c[:n] for c in curves])[:, None], window, 1)[:, 0]
            mean, std = curves.mean(0), (curves.std(0) if len(curves) > 1 else torch.zeros(curves.shape[1]))
            x = torch.arange(len(mean)) + window - 1  # the window's last iteration
            ax.plot(x, mean, color=colour, label=f"{label} ({len(curves)} seeds)")
            ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.25)
            drawn = True
        ax.set(title=title, xlabel="iteration", ylabel="alignment of the iteration's samples")
        ax.grid(alpha=0.3)
        ax.legend()
    if drawn:
        figure.savefig(os.path.join(out, "value_function.png"), dpi=100, bbox_inches="tight")


def hack_table(folders, prompt=RESULTS_PROMPT):
    """What the learned reward and the judge say of eval samples with 1, 2, 3 and 4+ objects
    found (pooled over seeds): does the reward rate a wrong count as the judge does?"""
    reward = shapes.learned_reward()
    groups = {}  # (run, objects) -> [(learned, judge)]
    for run, paths in [("pretrained", list(folders.values())[0][:1]), *folders.items()]:
        for path in paths:
            images = eval_tiles(path)[prompt, "pretrained" if run == "pretrained" else "finetuned"]
            prompts = [prompt] * len(images)
            scores = torch.stack([reward(images, prompts), shapes.shapes_reward(images, prompts)], 1)
            for s, score in zip(shapes.analyse(images, prompts), scores.tolist()):
                groups.setdefault((run, min(s["objects"], 4)), []).append(score)
    print(f"\nLearned reward / judge by the number of objects found, {prompt} (images: mean learned "
          "reward / mean judge), last evaluation, seeds pooled\n\n| run | 1 | 2 | 3 | 4 or more |\n|---|---|---|---|---|")
    for run in ["pretrained", *folders]:
        print(f"| {run} | " + " | ".join(
            f"{len(g)}: {sum(a for a, _ in g) / len(g):+.2f} / {sum(b for _, b in g) / len(g):+.2f}"
            if (g := groups.get((run, n))) else "0" for n in (1, 2, 3, 4)) + " |")
    return groups


def overoptimisation_figure(out, evals, prefix="learned"):
    """Gao et al. (2022)'s figure in miniature, for one prompt: the proxy (the learned reward,
    trained on), the judge's mean and the gold measure (the exact rate: colour, count and every
    shape right, which scores four squares for three as wrong where the judge gives half credit)
    against the KL bound from the pretrained model (and below, against the iteration), one line
    per beta, a point per evaluation (mean +- std over seeds); and an eval grid: pretrained /
    beta 0 / the beta whose gold measure gained most, the first 16 eval seeds of training seed 0,
    4x nearest."""
    from matplotlib.figure import Figure
    from torchvision.utils import save_image

    prompt, betas = OVEROPTIMISATION[prefix]
    figure = Figure(figsize=(15, 8))
    figure.suptitle(prompt)
    axes = figure.subplots(2, 3)  # columns: proxy, judge, gold; rows: against the KL, the iteration
    best, best_gold = None, -float("inf")
    for column, key in enumerate(("reward", "judge", "exact")):
        for beta in betas:
            points = sorted((k, rows) for (run, k), rows in evals.items() if run == f"{prefix}_b{beta}")
            if not points:
                continue
            pre = mean_std([r[f"{key}_pretrained"] for r in points[0][1]])[0]
            y = [(pre, 0.0)] + [mean_std([r[f"{key}_finetuned"] for r in rows]) for _, rows in points]
            for row, x in enumerate(([(0.0, 0.0)] + [mean_std([r["kl_bound"] for r in rows]) for _, rows in points],
                                     [(0, 0.0)] + [(k, 0.0) for k, _ in points])):
                axes[row, column].errorbar(
                    [m for m, _ in x], [m for m, _ in y], xerr=[s for _, s in x], yerr=[s for _, s in y],
                    marker="o", capsize=2, label=f"β = {beta}")
            if key == "exact" and y[-1][0] > best_gold and beta != "0":
                best, best_gold = beta, y[-1][0]
    for i, ax in enumerate(axes.flat):
        row, column = divmod(i, 3)
        if row == 0:  # Gao et al. plot against the square root of the KL; ticks at squares
            ax.set_xscale("function", functions=(lambda v: v.clip(0) ** 0.5, lambda v: v**2))
            top = max(ax.get_xlim()[1], 1) ** 0.5
            step = next(s for s in (1, 2, 5, 10, 20, 50, 100, 200, 500) if top / s <= 6)
            ax.set_xticks([(k * step) ** 2 for k in range(int(top / step) + 1)])
        ax.set(xlabel=("KL bound from the pretrained model (nats, √ axis)", "iteration")[row],
               ylabel=("proxy: learned reward (trained on)", "judge: the analyser's mean (held out)",
                       "gold: exact rate (held out)")[column])
        ax.grid(alpha=0.3)
        ax.legend()
    figure.savefig(os.path.join(out, figure_name("overoptimisation", prefix)), dpi=100, bbox_inches="tight")
    last = {run: max(k for r, k in evals if r == run) for run, _ in evals}
    rows = []
    for run in (f"{prefix}_b0", f"{prefix}_b{best}"):
        if run in last and os.path.exists(folder := os.path.join(out, run + "_s0", f"eval_{last[run]:04d}")):
            tiles = eval_tiles(folder)
            rows += [tiles[prompt, "pretrained"][:16]] * (not rows) + [tiles[prompt, "finetuned"][:16]]
    if rows:
        grid = F.interpolate(torch.cat(rows), scale_factor=4, mode="nearest")
        save_image(grid, os.path.join(out, figure_name("overoptimisation_eval", prefix)),
                   nrow=min(16, len(rows[0])), pad_value=1)


def main(argv=None):
    """The command line; bad input is one line, exit 2, before any run starts or file is written."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            sys.exit(print(f"results.py: error: {message}", file=sys.stderr) or 2)

    parser = Parser(description="Remake every run, table and figure of RESULTS.md")
    parser.add_argument("folder", nargs="?", help="where the runs go (skipped when done, resumed)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (threads: cores / jobs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--horizon", type=int, default=300,
                        help="iterations of the learned-reward runs (the others: half)")
    parser.add_argument("--eval-samples", type=int, default=64, help="eval seeds per prompt")
    parser.add_argument("--quick-seeds", type=int, default=10,
                        help="training seeds of the quick start's own table: 0 to N - 1")
    parser.add_argument("--breakdown", metavar="EVAL_FOLDER",
                        help="instead: the analyser's scores of one --eval of the shapes world")
    args = parser.parse_args(argv)
    if args.breakdown is not None:
        if args.folder is not None:
            parser.error("give a results FOLDER or --breakdown EVAL_FOLDER, not both")
        if not os.path.isfile(os.path.join(args.breakdown, "eval.json")):
            parser.error(f"--breakdown {args.breakdown}: no eval.json there (the folder of a --eval)")
        return breakdown(args.breakdown)
    if args.folder is None:
        parser.error("give the results FOLDER (or --breakdown EVAL_FOLDER)")
    for name in ("jobs", "horizon", "eval_samples", "quick_seeds"):
        if getattr(args, name) < (2 if name == "eval_samples" else 1):
            parser.error(f"--{name.replace('_', '-')} must be at least {2 if name == 'eval_samples' else 1}")
    if any(not 0 <= s < 2**63 for s in args.seeds) or len(set(args.seeds)) < len(args.seeds):
        parser.error(f"--seeds must be distinct whole numbers in [0, 2^63), got {args.seeds}")
    if os.path.exists(args.folder) and not (os.path.isdir(args.folder) and os.access(args.folder, os.W_OK)):
        parser.error(f"{args.folder} is not a writable folder")
    return reproduce(args.folder, args.seeds, args.jobs, args.horizon, args.eval_samples,
                     range(args.quick_seeds))


if __name__ == "__main__":
    main()

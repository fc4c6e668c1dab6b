"""`edgeshard-mpi eval JOB`: the quality of a configuration, measured through the split model.

Perplexity over a text (WikiText-2's test split) in the standard strided windows: a window
of `eval.window` tokens moves by `eval.stride`; each window scores only the tokens the
previous one did not (the first window scores all but its first token), so every token is
scored once, with up to window - stride tokens of context before it. The windows walk the
job's plan like a prefill: rank 0 embeds, each stage passes its hidden states to the next
over the job's wire (wire.py), and the last stage turns every position's logits into
log-likelihoods of the next token (rank 0 sends it the window's ids to score against) and
returns two numbers per window: the summed negative log-likelihood and the tokens scored.

With a lossy wire the same windows are also run with wire = "exact", and the workload's
prompts are generated twice (exact, then the job's wire, through the ordinary runtime), so
the file holds what the compression costs: perplexity both ways and token agreement.
"""

from __future__ import annotations

import math
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from . import cecollm_eval, watchdog
from .job import JobError
from .wire import Codec

TAG_TARGETS, TAG_RESULT, TAG_ACT = 901, 902, 1000


def windows(n_tokens: int, window: int, stride: int, max_windows: int = 0) -> np.ndarray:
    """[W, 3] (begin, end, scored): the strided windows over n tokens; `scored` counts the
    targets of the window's last positions that no earlier window scored."""
    out, begin, prev_end = [], 0, 0
    while True:
        end = min(begin + window, n_tokens)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens or (max_windows and len(out) == max_windows):
            break
        begin += stride
    return np.array(out, dtype=np.int64)


def window_nll(logits: torch.Tensor, ids: torch.Tensor, scored: int) -> tuple[float, int]:
    """Summed NLL of the last `scored` tokens of a window (ids [L]) given logits [L, V]
    (position j predicts token j + 1); the window's first token has no prediction."""
    length = ids.shape[0]
    first = max(length - scored, 1)  # target positions first..L-1
    logp = torch.log_softmax(logits[first - 1 : length - 1].float(), dim=-1)
    nll = -logp.gather(1, ids[first:length].view(-1, 1)).double().sum()
    return float(nll), length - first


def perplexity(stages_plan, stages, ids, wins, codec, tp, spec, window: int, log):
    """Run every window through the chain; rank 0 returns [W, 2] (nll sum, tokens).
    `codec`: one Codec for every hop, or (wire = "auto") a list of wire names per hop."""
    me, last = tp.rank, len(stages_plan) - 1
    if isinstance(codec, Codec):
        codecs = [codec] * len(stages_plan)  # [i]: the hop into stage i
        name = codec.wire
    else:
        codecs, name = [Codec("exact"), *(Codec(w) for w in codec)], "auto"
    ranks = [st.rank for st in stages_plan]
    caches = {i: st.new_cache(1, window) for i, st in stages.items()}
    for st in stages.values():
        st.all_logits = True
    out = np.zeros((len(wins), 2)) if me == 0 else None
    try:
        for w, (begin, end, scored) in enumerate(wins):
            length = int(end - begin)
            pos = torch.arange(length).unsqueeze(0)
            local = None
            if me == 0 and ranks[last] != 0:
                tp.isend(torch.from_numpy(ids[begin:end]), ranks[last], TAG_TARGETS)
            for i, st in enumerate(stages_plan):
                if st.rank != me:
                    continue
                stage = stages[i]
                if i == 0:
                    x = torch.from_numpy(ids[begin:end]).view(1, length)
                elif ranks[i - 1] == me:
                    x = local
                else:
                    n = codecs[i].nbytes(length, spec.hidden_size, stage.dtype)
                    buf = torch.empty(n, dtype=torch.uint8)
                    tp.sleep_wait(tp.irecv(buf, ranks[i - 1], TAG_ACT + i))
                    h = codecs[i].decode(buf, length, spec.hidden_size, stage.dtype)
                    x = h.view(1, length, -1).to(stage.device)
                cache = caches[i]
                if cache is not None:
                    cache.reset()
                y = stage(x.to(stage.device), cache, pos.to(stage.device), 0)
                if i < last:
                    if ranks[i + 1] == me:  # no wire between two stages of one rank
                        local = y
                    else:
                        out_codec = codecs[i + 1]
                        tp.isend(out_codec.encode(y[0].cpu()), ranks[i + 1], TAG_ACT + i + 1)
                    continue
                if me == 0:
                    target = torch.from_numpy(ids[begin:end])
                else:
                    target = torch.empty(length, dtype=torch.int64)
                    tp.sleep_wait(tp.irecv(target, 0, TAG_TARGETS))
                nll, count = window_nll(y[0].cpu(), target, int(scored))
                result = torch.tensor([nll, count], dtype=torch.float64)
                if me == 0:
                    out[w] = result.numpy()
                else:
                    tp.isend(result, 0, TAG_RESULT)
            if me == 0 and ranks[last] != 0:
                buf = torch.empty(2, dtype=torch.float64)
                tp.sleep_wait(tp.irecv(buf, ranks[last], TAG_RESULT))
                out[w] = buf.numpy()
            tp.progress()
            watchdog.beat()
            if me == 0 and (w + 1) % max(1, len(wins) // 8) == 0:
                log.info(f"eval ({name}): {w + 1}/{len(wins)} windows")
        tp.flush()
    finally:
        for st in stages.values():
            st.all_logits = False
    return out


def _generate(job, spec, prompts, plan, stages, device, tp, dec, wire: str):
    """Greedy tokens of the workload's prompts through the runtime; rank 0: [n, steps]."""
    from . import schedule as sch
    from .runtime import Runtime, Workload

    wl = job.workload
    b = dec.micro_batch_size
    groups = wl.prompts // b
    feed = prompts.ids.reshape(groups, b, wl.prompt_tokens) if tp.rank == 0 else None
    kind = Runtime
    if job.partition.strategy == "ce-collm":  # "exact": the same split, never exiting
        kind, wire = cecollm_eval.generating_runtime(job, wire)
    runtime = kind(
        tp,
        [st.rank for st in plan.stages],
        stages,
        sch.Shape(groups=groups, slots=dec.micro_batches, steps=wl.new_tokens),
        dec.order,
        Workload(feed, b, wl.prompt_tokens, wl.new_tokens),
        device,
        record_events=False,
        wire=plan.info["wires"] if wire == "auto" else wire,
    )
    tp.quiet_barrier()
    res = runtime.run(time.perf_counter())
    tp.quiet_barrier()
    return res.tokens.reshape(wl.prompts, wl.new_tokens) if tp.rank == 0 else None


def agreement(exact: np.ndarray, other: np.ndarray) -> dict:
    """Token agreement of two [n, steps] generations: per position, and the mean fraction
    of each sequence generated before its first difference (after it, the texts diverge)."""
    same = exact == other
    first = np.where(same.all(axis=1), same.shape[1], np.argmin(same, axis=1))
    return {
        "token_agreement": float(same.mean()),
        "prefix_agreement": float(np.mean(first / same.shape[1])),
    }


def _needed_text(text: str, tok, need: int | None) -> str:
    """The text, or, when only the first `need` tokens are evaluated, a prefix of whole
    lines long enough to hold them (tokenizing all of WikiText-2 takes seconds). Tokens
    never span a line break, so the prefix's tokens are the full text's."""
    if not need:
        return text
    chars = need * 8
    while chars < len(text):
        cut = text.find("\n", chars)
        if cut < 0:
            break
        if len(tok.encode(text[: cut + 1])) >= need:
            return text[: cut + 1]
        chars *= 2
    return text


def _eval_tokens(job, spec, need: int | None = None):
    """Rank 0: the evaluation text's token ids (at least the first `need` when given),
    and the tokenizer's name."""
    from .data import load_tokenizer

    ds = job.eval.dataset
    if ds is None:
        raise JobError(
            "eval.dataset: no text to evaluate on; set eval.dataset (or workload.dataset) "
            "to WikiText-2's wiki.test.raw"
        )
    if not Path(ds).is_file():
        raise JobError(f"eval.dataset: {ds} not found; point it at WikiText-2's wiki.test.raw")
    try:
        text = Path(ds).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise JobError(f"eval.dataset: cannot read {ds} as UTF-8 text ({e})") from None
    tok = load_tokenizer(job.workload.tokenizer, job.model.source, spec.vocab_size)
    ids = np.asarray(tok.encode(_needed_text(text, tok, need)), dtype=np.int64)
    if len(ids) < 2:
        raise JobError(f"eval.dataset: {ds} holds fewer than 2 tokens; give a real text")
    return ids, tok.name


def write_eval(path: Path, record: dict) -> Path:
    """One HDF5 file, built in memory, published without overwriting (outfiles.py)."""
    import io
    import json

    import h5py

    from .outfiles import publish

    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f.attrs["kind"] = "eval"
        for k, v in record["attrs"].items():
            f.attrs[k] = json.dumps(v) if isinstance(v, dict | list) else v
        for name, (data, units, doc) in record["data"].items():
            ds = f.create_dataset(name, data=data)
            ds.attrs["units"], ds.attrs["description"] = units, doc
    data = buf.getbuffer()
    return publish(lambda tmp: tmp.write_bytes(data), path)


def eval_job(job_path: str) -> int:
    """`edgeshard-mpi eval JOB` under MPI; returns the exit status."""
    from mpi4py import MPI

    from .comm import Transport
    from .planning import plan_step, profile_step
    from .runner import load_stages, start_watchdog, watched_write
    from .startup import (
        EXIT_USER_ERROR,
        Log,
        UserError,
        agree,
        describe_ranks,
        setup,
        start_testbed,
    )

    tp = Transport(MPI.COMM_WORLD)
    log = Log(tp.rank)
    wd = start_watchdog(tp)
    try:
        job, spec, prompts, out = setup(job_path, tp)
        wd.set_limit(watchdog.auto_limit(None, job.runtime.stall_timeout_s))
        ids = tok_name = wins = None
        ev = job.eval
        window = ev.window or spec.max_position_embeddings
        stride = ev.stride or max(1, window // 2)
        err = None
        if stride > window:
            err = f"eval.stride = {stride} exceeds the window ({window}); use at most that"
        elif tp.rank == 0:
            try:
                need = (ev.max_windows - 1) * stride + window + 1 if ev.max_windows else None
                ids, tok_name = _eval_tokens(job, spec, need)
                wins = windows(len(ids), window, stride, ev.max_windows)
            except JobError as e:
                err = str(e)
        agree(tp, err)
        wins = tp.bcast(wins)
        tb, emulation = start_testbed(job, tp)
        devices, device = describe_ranks(job, tp, tb)
        watchdog.phase("profile")
        prof = profile_step(job, spec, devices, device, tp, log, out)
        watchdog.phase("plan")
        plan, _, _, dec = plan_step(job, spec, devices, prof, tp, log)
        log.info(f"plan ({plan.strategy}): {plan.describe()}; wire = {job.transport.wire}")
        watchdog.phase("load")
        stages, _ = load_stages(job, spec, plan, device, tp)
        watchdog.phase("infer")
        ce = job.partition.strategy == "ce-collm"  # early exits are lossy too
        mine = "ce-collm" if ce else job.transport.wire
        wires = ["exact"] if mine == "exact" else ["exact", mine]
        head = cecollm_eval.exit_head(job, spec, device, tp) if ce else None
        nll, seconds, sent = {}, {}, {}
        for w in wires:
            tp.quiet_barrier()
            t0, b0 = time.perf_counter(), tp.bytes_sent
            if w == "ce-collm":
                codec = Codec(job.transport.wire)
                nll[w] = cecollm_eval.perplexity(
                    plan, stages, ids, wins, codec, tp, spec, window, job, log, head
                )
            else:
                codec = plan.info["wires"] if w == "auto" else Codec(w)  # auto: per hop
                nll[w] = perplexity(plan.stages, stages, ids, wins, codec, tp, spec, window, log)
            seconds[w] = time.perf_counter() - t0
            sent[w] = tp.gather(tp.bytes_sent - b0)
        gen = {}
        if ev.agreement and len(wires) > 1:
            for w in wires:
                gen[w] = _generate(job, spec, prompts, plan, stages, device, tp, dec, w)
    except UserError as e:
        wd.stop()
        for line in str(e).splitlines():
            log.error(line)
        return EXIT_USER_ERROR
    except Exception:
        print(f"[rank {tp.rank}] internal error:\n{traceback.format_exc()}", file=sys.stderr)
        raise
    with watched_write(tp, wd):  # a rank 0 stopped while writing ends the job
        if tp.rank != 0:
            return 0
        attrs = {
            "name": job.name,
            "job": job.text,
            "model_source": job.model.source,
            "dtype": job.model.dtype,
            "kernels": job.runtime.kernels,
            "wire": job.transport.wire,
            "plan": plan.describe(),
            "ranks": tp.size,
            "emulation": emulation,
            "dataset": str(job.eval.dataset),
            "tokenizer": tok_name,
            "text_tokens": len(ids),  # with max_windows: of the prefix read (_needed_text)
            "window": window,
            "stride": stride,
            "windows": len(wins),
        }
        data = {
            "windows": (wins, "tokens", "begin, end, scored tokens of each window"),
        }
        for w in wires:
            total, count = nll[w].sum(axis=0)[:2]
            ppl = math.exp(total / count)
            key = "" if w == mine else "_exact"
            if w == "ce-collm":  # third column: tokens scored by the exit head
                attrs["exit_rate"] = float(nll[w][:, 2].sum() / count)
                attrs["threshold"] = job.ce_collm.threshold
                attrs["standalone"] = job.ce_collm.standalone
            attrs[f"perplexity{key}"] = ppl
            attrs[f"nll_per_token{key}"] = total / count
            attrs[f"tokens_scored{key}"] = int(count)
            attrs[f"eval_s{key}"] = seconds[w]
            attrs[f"bytes_sent{key}"] = int(sum(sent[w]))
            data[f"nll_{w}"] = (nll[w], "nats, tokens", f"per window: summed NLL, tokens ({w})")
            log.info(
                f"perplexity (wire {w}): {ppl:.6f} over {int(count)} tokens, {len(wins)} "
                f"windows of {window} (stride {stride}), {sum(sent[w]) / 1e6:.3f} MB sent, "
                f"{seconds[w]:.2f} s"
            )
        if gen:
            agree = agreement(gen["exact"], gen[mine])
            attrs |= agree
            data["prompt_ids"] = (prompts.ids, "token ids", "the prompts generated from")
            for w, toks in gen.items():
                data[f"generated_{w}"] = (toks, "token ids", f"greedy tokens, wire {w}")
            log.info(
                f"agreement with exact ({job.workload.prompts} prompts x "
                f"{job.workload.new_tokens} tokens): {agree['token_agreement']:.1%} of tokens, "
                f"{agree['prefix_agreement']:.1%} before the first difference"
            )
        from .outfiles import OutputError

        try:
            written = write_eval(out, {"attrs": attrs, "data": data})
        except OutputError as e:
            log.error(f"results not written: {e.strerror}")
            return EXIT_USER_ERROR
        log.info(f"wrote {written}")
        return 0

"""LASeR inside TRL's GRPOTrainer: one reward model per prompt, chosen by the selector's bandit.

Two ways, both on a plain TRL install (`pip install "laser-rl[trl]"`); TRL is imported only here.

1. `LaserRewardFunction` is a TRL reward function. With `reward_funcs=[laser]` and
   `callbacks=[laser.callback()]`, an unmodified `GRPOTrainer` runs LASeR with every feedback signal that
   needs no log-probs (spread, verifier, majority, consensus):

       laser = LaserRewardFunction(selector, num_generations=8, encoder=ContextEncoder(hidden, proj_dim=64))
       trainer = GRPOTrainer(model, reward_funcs=[laser], args=config, train_dataset=ds, callbacks=[laser.callback()])

2. `LaserGRPOTrainer(..., laser=laser)` is a GRPOTrainer subclass for the paper's `pair_loss`: it hands the
   reward function TRL's exact prompt ids and feeds the bandit the policy and reference log-probs TRL
   already computed (one extra no-grad policy forward only where TRL skipped it).

Per generation batch (one optimizer step by default), in TRL's layout (the n completions of a prompt are
consecutive; a group may straddle two ranks):
  contexts   one prompt-only policy forward per prompt, last prompt-token hidden state -> ContextEncoder;
             with several ranks each group's context comes from the rank holding its first sample, every
             rank runs the same number of forward batches (under ZeRO-3 a forward is a collective), and
             the contexts are all-gathered;
  select     every rank runs select() on the same gathered contexts (so RNG and bandit state stay in
             lockstep) and rank 0's arms are broadcast (so float differences between devices can never
             split a choice);
  score      each rank scores only its own completions, each with its prompt's arm: one RM pass per
             completion in all;
  feedback   scores (and what the signal needs) are gathered and every rank updates its bandit with the
             same inputs, so every copy of the selector stays identical.
An eval pass (the policy in eval mode) selects exploit-only and never updates the bandit.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from laser_rl.bandits import UCB1, Exp3, FixedArm, LinearBandit, RandomArm, RoundRobin
from laser_rl.context import ContextEncoder
from laser_rl.lm import hidden_size, pad, prefill
from laser_rl.selector import ENSEMBLE, RewardSelector

SELECTOR_FILE = "laser_selector.pt"  # written into every checkpoint-N/ beside TRL's files
ENCODER_FILE = "laser_context_encoder.pt"
LOGPROB_INPUTS = ("policy_logps", "ref_logps")  # inputs only LaserGRPOTrainer can supply


# =================================================================================================
# Small helpers: text of TRL prompts/completions, ranks, exploit-only selection
# =================================================================================================


def _completion_text(completion) -> str:
    """A TRL completion as text: a string as is, chat messages (the assistant's turn) as their joined contents."""
    if isinstance(completion, str):
        return completion
    return "\n".join(_content(m.get("content", "")) for m in completion)


def _prompt_text(prompt) -> str:
    """A TRL prompt as the text an RM scores (prompt, response) pairs with: chat -> the last user message."""
    if isinstance(prompt, str):
        return prompt
    users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ValueError(f"chat prompt has no user message: {str(prompt)[:120]}")
    return _content(users[-1]["content"])


def _content(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))  # content blocks


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _comm_device(model) -> torch.device:
    """Where collectives run: the policy's device (NCCL needs CUDA tensors, gloo takes CPU ones)."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return next(model.parameters()).device
    return torch.device("cpu")


def _all_gather_cat(x: Tensor, device: torch.device) -> Tensor:
    """Concatenate a same-shaped tensor from every rank, in rank order (CPU result)."""
    rank, world = _rank_world()
    if world == 1:
        return x.cpu()
    x = x.contiguous().to(device)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat([p.cpu() for p in parts])


def _all_gather_list(values: list) -> list:
    """Concatenate a Python list from every rank, in rank order."""
    rank, world = _rank_world()
    if world == 1:
        return list(values)
    parts: list = [None] * world
    dist.all_gather_object(parts, list(values))
    return [v for part in parts for v in part]


def _all_reduce_sum(value: float, device: torch.device) -> float:
    rank, world = _rank_world()
    if world == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def exploit_arms(selector: RewardSelector, contexts: Tensor, step: int = 0) -> Tensor:
    """Arms [P] the selector's bandit currently believes best, without exploring and without changing any state.

    LinUCB / Thompson / epsilon-greedy: argmax of the ridge estimate x . theta_k (ties to the lowest index);
    Exp3: the most probable arm; UCB1: the best empirical mean; fixed / round-robin: the arm training uses
    next; random: uniform draws from a generator seeded by `step` (the bandit's own generator is not drawn).
    Score ensembles: ENSEMBLE for every prompt.
    """
    P = contexts.shape[0]
    bandit = selector.bandit
    if bandit is None:
        return torch.full((P,), ENSEMBLE, dtype=torch.long)
    if selector.granularity == "batch":
        contexts = contexts.float().mean(dim=0, keepdim=True)
    if isinstance(bandit, LinearBandit):
        mean, _ = bandit.scores(contexts)
        arms = mean.argmax(dim=1).cpu()
    elif isinstance(bandit, Exp3):
        arms = bandit.probabilities().argmax().reshape(1).expand(contexts.shape[0])
    elif isinstance(bandit, UCB1):
        untried = torch.tensor(-math.inf, dtype=torch.float64)
        means = torch.where(bandit.counts > 0, bandit.sums / bandit.counts.clamp_min(1e-12), untried)
        arms = means.argmax().reshape(1).expand(contexts.shape[0])
    elif isinstance(bandit, FixedArm):
        arms = torch.full((contexts.shape[0],), bandit.arm, dtype=torch.long)
    elif isinstance(bandit, RoundRobin):
        arms = torch.full((contexts.shape[0],), int(bandit.turn) % bandit.num_arms, dtype=torch.long)
    elif isinstance(bandit, RandomArm):
        generator = torch.Generator().manual_seed(int(step))
        arms = torch.randint(bandit.num_arms, (contexts.shape[0],), generator=generator)
    else:
        raise ValueError(f"no exploit-only selection for bandit {type(bandit).__name__}; eval needs one")
    arms = arms.long().cpu()
    return arms.expand(P).clone() if selector.granularity == "batch" else arms.clone()


def _is_contextual(selector: RewardSelector) -> bool:
    return isinstance(selector.bandit, LinearBandit)


@torch.no_grad()
def prompt_states_from_ids(model, prompt_ids: Sequence[Sequence[int]], batch_size: int = 16) -> Tensor:
    """Last-layer hidden state at each prompt's last token, float32 [len(prompt_ids), hidden] on the CPU.

    One prompt-only forward (laser_rl.lm.prefill: left padding, positions from the mask, one logit kept) per
    batch of `batch_size` prompts, so a prompt gives the same state alone or batched.
    """
    if any(len(x) == 0 for x in prompt_ids):
        raise ValueError("a prompt has no tokens: nothing to pool")
    was_training = model.training
    model.eval()  # dropout would give one prompt different contexts
    try:
        pooled = []
        for start in range(0, len(prompt_ids), batch_size):
            ids, mask = pad(prompt_ids[start : start + batch_size], pad_id=0, side="left")  # pads are masked out
            out = prefill(model, ids, mask, hidden=True, cache=False)
            pooled.append(out.hidden_states[-1][:, -1].float().cpu())  # left padded: the last column is the last token
    finally:
        model.train(was_training)
    return torch.cat(pooled)


def trl_prompt_ids(tokenizer, prompts: Sequence) -> list[list[int]]:
    """Prompt token ids as GRPOTrainer builds them for generation (text: the tokenizer's call; chat: the chat
    template with the generation prompt). Custom `chat_template`/`tools` arguments of the trainer are not seen
    here; LaserGRPOTrainer passes TRL's exact ids instead."""
    if isinstance(prompts[0], str):
        return [list(ids) for ids in tokenizer(text=list(prompts))["input_ids"]]
    out = tokenizer.apply_chat_template(
        conversation=list(prompts), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return [list(ids) for ids in out["input_ids"]]


# =================================================================================================
# The reward function
# =================================================================================================


class LaserRewardFunction:
    """A TRL reward function that scores each prompt's completions with the one RM the selector picks.

    selector: a RewardSelector (its RMs score text: (prompt, completion) with chat prompts reduced to the
        last user message, see `_prompt_text`).
    num_generations: TRL's `num_generations` (the group size n); must equal the trainer's.
    encoder: ContextEncoder over the policy's hidden size; required for contextual bandits (LinUCB, ...).
    label_column: dataset column passed to the RMs as `labels` (reference answers).
    domain_column: dataset column of per-prompt tags, for `laser/domain/<tag>/arm_frac/<rm>` metrics.
    correct_column: a per-completion field of TRL's reward kwargs holding correctness (bool, 0/1, or None for
        unlabeled), e.g. an extra field of a `rollout_func`; feeds `verifier`.
    answer_extractor: completion text -> final answer (hashable, None if none). Feeds `majority`, and
        `verifier` from `label_column` (correct = answer == label) when there is no correct_column.
    context_batch_size: prompts per context forward.
    """

    __name__ = "laser"  # TRL names the reward column after it: rewards/laser/mean

    def __init__(
        self,
        selector: RewardSelector,
        num_generations: int,
        encoder: ContextEncoder | None = None,
        label_column: str | None = None,
        domain_column: str | None = None,
        correct_column: str | None = None,
        answer_extractor: Callable[[str], Hashable | None] | None = None,
        context_batch_size: int = 16,
    ):
        if not isinstance(selector, RewardSelector):
            raise TypeError(f"selector must be a laser_rl RewardSelector, got {type(selector).__name__}")
        if int(num_generations) < 1:
            raise ValueError(f"num_generations must be >= 1, got {num_generations}")
        if int(context_batch_size) < 1:
            raise ValueError(f"context_batch_size must be >= 1, got {context_batch_size}")
        if _is_contextual(selector):
            if encoder is None:
                raise ValueError(
                    f"the selector's bandit ({type(selector.bandit).__name__}) reads contexts: pass "
                    "encoder=ContextEncoder(policy hidden size, proj_dim=...) with encoder.dim == the selector's context_dim"
                )
            if encoder.dim != selector.bandit.dim:
                raise ValueError(f"encoder.dim is {encoder.dim} but the selector's context_dim is {selector.bandit.dim}")
        needed = selector.feedback_inputs
        if "loss_before" in needed or "loss_after" in needed:
            raise ValueError(
                f"feedback {selector.feedback_name!r} needs losses before and after the update, which GRPOTrainer does "
                "not expose; use pair_loss (LaserGRPOTrainer), spread, verifier, majority or consensus"
            )
        if "correct" in needed and correct_column is None and (label_column is None or answer_extractor is None):
            raise ValueError(
                "feedback 'verifier' needs a correct/wrong check per completion: pass correct_column=<per-completion field>, "
                "or label_column=<dataset column> with answer_extractor=<completion -> answer>"
            )
        if "answers" in needed and answer_extractor is None:
            raise ValueError("feedback 'majority' needs answer_extractor=<completion text -> final answer or None>")
        self.selector, self.encoder = selector, encoder
        self.num_generations = self.num_generations_eval = int(num_generations)
        self.label_column, self.domain_column, self.correct_column = label_column, domain_column, correct_column
        self.answer_extractor = answer_extractor
        self.context_batch_size = int(context_batch_size)
        self.needs_logprobs = any(name in needed for name in LOGPROB_INPUTS)
        self.policy = self.tokenizer = None
        self.trainer = None  # set by LaserGRPOTrainer: exact prompt ids, log-prob feedback
        self.loaded_from: str | None = None
        self.last_arms: Tensor | None = None  # the last step's arm per prompt (global order), for inspection
        self.pending: dict | None = None  # a training step waiting for log-prob feedback (LaserGRPOTrainer)

    # ----- binding ------------------------------------------------------------------------------
    def bind(self, policy, tokenizer, num_generations: int | None = None, num_generations_eval: int | None = None) -> None:
        """Attach the policy and tokenizer (the callback does this at on_train_begin)."""
        if num_generations is not None and int(num_generations) != self.num_generations:
            raise ValueError(
                f"LaserRewardFunction(num_generations={self.num_generations}) but the trainer's num_generations is "
                f"{num_generations}: they must match (the reward groups its completions by it)"
            )
        hidden = hidden_size(policy)
        if self.encoder is not None and hidden != self.encoder.input_dim:
            raise ValueError(f"encoder.input_dim is {self.encoder.input_dim} but the policy's hidden_size is {hidden}")
        if self.needs_logprobs and self.trainer is None:
            raise ValueError(
                f"feedback {self.selector.feedback_name!r} needs the policy's and reference's log-probs: train with "
                "LaserGRPOTrainer(..., laser=this) instead of GRPOTrainer"
            )
        _, world = _rank_world()
        if world > 1 and self.selector.consensus is not None:
            raise ValueError(
                "feedback 'consensus' (RewardSelector's default) audits the whole prompt-grouped batch inside "
                "select()/score(), which one rank does not hold with several ranks: build the selector with "
                "feedback='verifier' (labels), 'majority', 'spread' or 'pair_loss' there"
            )
        if world > 1 and self.selector.score_normalizer is not None:
            raise ValueError(
                "normalize_scores=True keeps per-rank running statistics; with several ranks build the selector without it"
            )
        policy_device = next(policy.parameters()).device
        if _is_contextual(self.selector) and policy_device.type == "cuda" and self.selector.bandit.device.type != "cuda":
            warnings.warn(
                f"the policy is on {policy_device} but the selector's bandit on {self.selector.bandit.device}: build the "
                "selector with bandit_kwargs={'device': 'cuda'} so its state stays on the GPU and backend='auto' takes the "
                "Triton kernels (docs/kernels.md)",
                stacklevel=2,
            )
        self.policy, self.tokenizer = policy, tokenizer
        if num_generations_eval is not None:
            self.num_generations_eval = int(num_generations_eval)

    def callback(self):
        """The TrainerCallback that binds the policy, saves `laser_selector.pt` into every checkpoint-N/ and
        restores it on `resume_from_checkpoint`."""
        return _laser_callback_class()(self)

    # ----- checkpoints --------------------------------------------------------------------------
    def save(self, directory: str) -> None:
        """Write the selector (and the encoder's projection) into a checkpoint directory."""
        os.makedirs(directory, exist_ok=True)
        self.selector.save(os.path.join(directory, SELECTOR_FILE))
        if self.encoder is not None:
            path = os.path.join(directory, ENCODER_FILE)
            torch.save(self.encoder.state_dict(), f"{path}.tmp")
            os.replace(f"{path}.tmp", path)

    def load(self, directory: str) -> None:
        """Restore what save() wrote; checks both files before changing anything."""
        selector_path = os.path.join(directory, SELECTOR_FILE)
        if not os.path.isfile(selector_path):
            raise FileNotFoundError(f"no {SELECTOR_FILE} in {directory}: this checkpoint was not written by a LASeR run")
        encoder_state = None
        encoder_path = os.path.join(directory, ENCODER_FILE)
        if self.encoder is not None and os.path.isfile(encoder_path):
            encoder_state = torch.load(encoder_path, map_location="cpu", weights_only=True)
            check = ContextEncoder(self.encoder.input_dim, self.encoder.proj_dim, self.encoder.normalize, self.encoder.bias)
            check.load_state_dict(encoder_state)  # a mismatch raises here, before the selector changes
        self.selector.load(selector_path)
        if encoder_state is not None:
            self.encoder.load_state_dict(encoder_state)
        self.loaded_from = directory

    # ----- the reward call ------------------------------------------------------------------------
    def __call__(self, prompts: list, completions: list, completion_ids: list | None = None, **kwargs: Any) -> list[float]:
        if self.policy is None:
            raise RuntimeError(
                "LaserRewardFunction is not bound to a policy: pass callbacks=[laser.callback()] to GRPOTrainer "
                "(or use LaserGRPOTrainer)"
            )
        training = bool(self.policy.training)  # TRL evaluates with the model in eval mode
        n = self.num_generations if training else self.num_generations_eval
        log_metric = kwargs.get("log_metric")
        log_extra = kwargs.get("log_extra")
        state = kwargs.get("trainer_state")
        B = len(prompts)
        if B == 0 or len(completions) != B:
            raise ValueError(f"got {B} prompts and {len(completions)} completions")
        rank, world = _rank_world()
        device = _comm_device(self.policy)
        if (world * B) % n:
            raise ValueError(f"{world} rank(s) x {B} completions is not a multiple of num_generations={n}")
        P = world * B // n
        global_index = torch.arange(rank * B, (rank + 1) * B)
        local_group = global_index // n  # [B] this rank's completions -> global prompt index
        owned = [i for i in range(B) if int(global_index[i]) % n == 0]  # first sample of a group lives here
        # Every column is read before select(): a missing one is an error before the bandit draws anything.
        columns = {name: self._column(kwargs, name) for name in (self.label_column, self.domain_column, self.correct_column)
                   if name is not None}
        labels = columns.get(self.label_column)
        texts = [_prompt_text(p) for p in prompts]
        responses = [_completion_text(c) for c in completions]

        contexts = self._contexts(prompts, owned, P, n, device)
        domains = None
        if self.domain_column is not None:
            domains = [str(d) for d in _all_gather_list([columns[self.domain_column][i] for i in owned])]
        if training:
            arms = self.selector.select(contexts, domains)
            if world > 1:  # rank 0's choice wins; every rank ran select() so RNG and statistics stay in lockstep
                arms_dev = arms.to(device)
                dist.broadcast(arms_dev, src=0)
                arms = arms_dev.cpu()
        else:
            arms = exploit_arms(self.selector, contexts, step=getattr(state, "global_step", 0))
        self.last_arms = arms

        local_arms = arms[local_group]
        passes_before = self.selector.rm_passes_total
        rewards = self.selector.score(texts, responses, local_arms, labels)
        if world > 1:  # every copy counts every rank's RM passes
            passes = _all_reduce_sum(self.selector.rm_passes_total - passes_before, device)
            self.selector.rm_passes_total = passes_before + int(passes)
        if log_extra is not None:
            label = f"ensemble:{self.selector.baseline}" if self.selector.ensemble else None
            log_extra("laser/rm", [label or self.selector.names[int(a)] for a in local_arms])

        if training:
            step = {"contexts": contexts, "arms": arms, "n": n, "scores": _all_gather_cat(rewards, device).view(P, n)}
            inputs = self._feedback_inputs(step, responses, completion_ids, labels, kwargs, device)
            if self.needs_logprobs:
                self.pending = {**step, "inputs": inputs}  # LaserGRPOTrainer adds the log-probs after TRL's forwards
            else:
                self.selector.feedback(contexts, arms, **inputs)
        if not (training and self.needs_logprobs):
            self.log_metrics(log_metric, device)
        return rewards.tolist()

    # ----- pieces of the call ---------------------------------------------------------------------
    def _contexts(self, prompts: list, owned: list[int], P: int, n: int, device: torch.device) -> Tensor:
        """[P, d] contexts in global prompt order ([P, 1] zeros when the bandit reads none)."""
        if not _is_contextual(self.selector):
            return torch.zeros(P, 1)
        _, world = _rank_world()
        B = len(prompts)
        counts = [sum(1 for g in range(r * B, (r + 1) * B) if g % n == 0) for r in range(world)]  # groups each rank owns
        # Every rank runs the same number of forward batches (under ZeRO-3 a forward is a collective): a rank that
        # owns fewer groups pads with copies of its first completion's prompt, whose states are dropped below.
        rows = owned + [0] * (max(counts) - len(owned))
        exact = getattr(self.trainer, "_laser_prompt_ids", None) if self.trainer is not None else None
        if exact is not None:  # LaserGRPOTrainer: TRL's exact generation ids, one list per completion
            if len(exact) != B:
                raise RuntimeError(f"TRL generated for {len(exact)} completions but the reward got {B}")
            ids = [exact[i] for i in rows]
        else:
            ids = trl_prompt_ids(self.tokenizer, [prompts[i] for i in rows])
        states = prompt_states_from_ids(self.policy, ids, self.context_batch_size)  # [width, H]
        if world > 1:
            gathered = _all_gather_cat(states.unsqueeze(0), device)  # [world, width, H]
            states = torch.cat([gathered[r, : counts[r]] for r in range(world)])
        else:
            states = states[: counts[0]]
        if states.shape[0] != P:
            raise RuntimeError(f"gathered {states.shape[0]} contexts for {P} prompt groups")
        return self.encoder(states)

    def _column(self, kwargs: dict, name: str) -> list:
        if name not in kwargs:
            columns = sorted(k for k in kwargs if k not in ("trainer_state", "log_metric", "log_extra", "environments"))
            raise KeyError(f"column {name!r} is not among the reward kwargs TRL passed: {columns}")
        return list(kwargs[name])

    def _feedback_inputs(self, step, responses, completion_ids, labels, kwargs, device) -> dict:
        """The inputs the selector's signal needs (`feedback_inputs`), gathered and grouped [P, n]."""
        P, n = step["scores"].shape
        needed = self.selector.feedback_inputs
        inputs: dict = {}
        if "scores" in needed:
            inputs["scores"] = step["scores"]
        answers = None
        if "answers" in needed or ("correct" in needed and self.correct_column is None):
            answers = _all_gather_list([self.answer_extractor(r) for r in responses])
        if "answers" in needed:
            inputs["answers"] = [answers[p * n : (p + 1) * n] for p in range(P)]
        if "correct" in needed:
            if self.correct_column is not None:  # per completion: bool, 0/1, None = unlabeled
                local = [math.nan if v is None else float(v) for v in self._column(kwargs, self.correct_column)]
                correct = _all_gather_cat(torch.tensor(local, dtype=torch.float32), device)
            else:  # the extracted answer against the label column; no label -> unlabeled (NaN)
                pairs = zip(answers, _all_gather_list(list(labels)))
                correct = torch.tensor([
                    math.nan if label is None else float(a is not None and str(a).strip() == str(label).strip())
                    for a, label in pairs
                ])
            inputs["correct"] = correct.view(P, n)
        if "response_lengths" in needed and not self.needs_logprobs:  # LaserGRPOTrainer passes TRL's own lengths
            if completion_ids is None:
                raise ValueError("feedback needs response lengths: TRL passed no completion_ids")
            lengths = torch.tensor([max(len(c), 1) for c in completion_ids], dtype=torch.float32)
            inputs["response_lengths"] = _all_gather_cat(lengths, device).view(P, n)
        return inputs

    def log_metrics(self, log_metric: Callable[[str, float], None] | None, device: torch.device) -> None:
        """selector.metrics() through TRL's log_metric; per-rank counts are summed over ranks first (TRL then
        averages over ranks, which leaves the sum)."""
        metrics = self.selector.metrics()
        for key in ("laser/rm_passes", "laser/invalid_samples", "laser/audit_rm_passes"):
            if key in metrics:
                metrics[key] = _all_reduce_sum(metrics[key], device)
        if log_metric is not None:
            for key, value in metrics.items():
                log_metric(key, float(value))

    def finish_step(self, policy_logps: Tensor, ref_logps: Tensor, response_lengths: Tensor,
                    log_metric: Callable[[str, float], None] | None) -> Tensor:
        """LaserGRPOTrainer: complete the pending step's feedback with gathered SEQUENCE log-probs [P, n]."""
        step, self.pending = self.pending, None
        if step is None:
            raise RuntimeError("no LASeR step is waiting for log-probs: the reward function did not run this step")
        inputs = dict(step["inputs"], policy_logps=policy_logps, ref_logps=ref_logps, response_lengths=response_lengths)
        try:
            return self.selector.feedback(step["contexts"], step["arms"], **inputs)
        finally:
            self.log_metrics(log_metric, _comm_device(self.policy))


# =================================================================================================
# The callback and the trainer subclass (TRL / transformers imported only when used)
# =================================================================================================


def _laser_callback_class():
    from transformers import TrainerCallback

    class LaserCallback(TrainerCallback):
        """Binds the policy and tokenizer, saves the selector into every checkpoint-N/, restores it on resume."""

        def __init__(self, laser: LaserRewardFunction):
            self.laser = laser

        def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
            tokenizer = getattr(processing_class, "tokenizer", processing_class)  # a processor wraps one
            self.laser.bind(
                model, tokenizer, getattr(args, "num_generations", None),
                getattr(args, "num_generations_eval", None) or getattr(args, "num_generations", None),
            )
            if state.global_step > 0 and self.laser.loaded_from is None:
                # Resumed: Trainer loaded checkpoint-<global_step>; LaserGRPOTrainer loads the exact path earlier.
                directory = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                if not os.path.isfile(os.path.join(directory, SELECTOR_FILE)):
                    raise FileNotFoundError(
                        f"resumed at step {state.global_step} but {directory} holds no {SELECTOR_FILE}: call "
                        "laser.load(<the checkpoint directory>) before trainer.train(resume_from_checkpoint=...)"
                    )
                self.laser.load(directory)

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.laser.save(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    return LaserCallback


def __getattr__(name: str):
    if name == "LaserGRPOTrainer":
        cls = _define_trainer()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _define_trainer():
    from trl import GRPOTrainer

    class LaserGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with LASeR for the log-prob signals (the paper's pair_loss): `laser` scores the completions,
        and after TRL's forwards the bandit learns from TRL's own policy and reference log-probs."""

        def __init__(self, model, reward_funcs=None, args=None, *, laser: LaserRewardFunction, callbacks=None, **kwargs):
            if not isinstance(laser, LaserRewardFunction):
                raise TypeError(f"laser must be a LaserRewardFunction, got {type(laser).__name__}")
            if reward_funcs is None:
                reward_funcs = [laser]
            elif not isinstance(reward_funcs, list) or not any(f is laser for f in reward_funcs):
                raise ValueError("LaserGRPOTrainer scores with `laser`: pass reward_funcs=None or a list that contains it")
            beta = 0.0 if args is None else float(args.beta)  # GRPOConfig's default beta is 0.0
            if laser.needs_logprobs and beta == 0.0:
                raise ValueError(
                    f"feedback {laser.selector.feedback_name!r} needs the reference model's log-probs, but GRPOConfig "
                    "beta=0.0 loads no reference model: set beta > 0 (e.g. 0.04) or use a signal without log-probs"
                )
            callbacks = list(callbacks or [])
            if not any(getattr(cb, "laser", None) is laser for cb in callbacks):
                callbacks.append(laser.callback())
            laser.trainer = self
            self.laser = laser
            self._laser_prompt_ids = None
            super().__init__(model, reward_funcs, args, callbacks=callbacks, **kwargs)

        def _generate(self, prompts):
            out = super()._generate(prompts)
            self._laser_prompt_ids = out[0]  # the exact prompt ids TRL generated from, one list per completion
            return out

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            self._laser_prompt_ids = None
            if self.laser.pending is None:  # eval, or a signal fed inside the reward call
                return output
            mask = output["completion_mask"]
            if "tool_mask" in output:
                mask = mask * output["tool_mask"]
            mask = mask.float()
            policy = output.get("old_per_token_logps")
            if policy is None:  # TRL skips this forward when generation and optimisation steps align
                ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
                attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
                with torch.no_grad():
                    policy, _, _ = self._get_per_token_logps_and_entropies(
                        self.model, ids, attention, output["completion_ids"].size(1),
                        batch_size=self.args.per_device_train_batch_size,
                    )
            ref = output.get("ref_per_token_logps")
            if ref is None:
                raise RuntimeError("TRL computed no reference log-probs (beta == 0?): pair_loss needs them")
            device = _comm_device(self.model)
            P, n = self.laser.pending["scores"].shape
            seq = lambda t: _all_gather_cat(((t.float() * mask).sum(dim=1)).detach(), device).view(P, n)  # noqa: E731
            lengths = _all_gather_cat(mask.sum(dim=1).clamp_min(1.0), device).view(P, n)
            mode = "train" if self.model.training else "eval"
            self.laser.finish_step(seq(policy), seq(ref), lengths, lambda k, v: self._metrics[mode][k].append(v))
            return output

        def _load_optimizer_and_scheduler(self, checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)
            if checkpoint is not None:  # the exact resume path, before on_train_begin
                self.laser.load(checkpoint)

    return LaserGRPOTrainer


__all__ = ["LaserRewardFunction", "LaserGRPOTrainer", "exploit_arms", "prompt_states_from_ids", "SELECTOR_FILE"]

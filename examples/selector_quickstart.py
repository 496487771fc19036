"""Quickstart: LASeR's RewardSelector inside your own RL loop, on a tiny policy built offline (seconds, CPU).

    python examples/selector_quickstart.py

Per step: the policy samples n responses for each of P prompts; the bandit picks ONE reward model per prompt from
the policy's hidden state of the prompt; only that RM scores the prompt's n samples; after your policy update, the
bandit learns from a feedback signal. Swap `tiny_policy()` for your model (AutoModelForCausalLM.from_pretrained)
and the rule RMs for yours: RM directories, implicit:<dir>, module:function, http(s):// URLs or noise[:sigma].
"""

from __future__ import annotations

import copy
import os
import tempfile

import torch

from laser_rl import RewardSelector
from laser_rl.context import ContextEncoder
from laser_rl.lm import sample, sequence_logprobs

DATA = [  # prompt, reference answer, domain
    ("What is 2 + 3?", "5", "math"),
    ("What is 7 + 1?", "8", "math"),
    ("Tom is a cat. Is Tom an animal?", "Yes", "logic"),
    ("Write a short happy poem about the sea.", None, "writing"),
]


def tiny_policy():
    """A 2-layer Llama with random weights and a BPE tokenizer trained here: nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>", "<unk>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([p for p, _, _ in DATA] * 20 + ["The answer is 5. Yes. No. 0 1 2 3 4 5 6 7 8 9"] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval(), tokenizer


# Rule reward models with OpenRLHF's batch signature: fn(prompts, responses, labels) -> one score per sample.
def exact_match(prompts, responses, labels):
    return [float(label is not None and label in response) for response, label in zip(responses, labels)]


def brevity(prompts, responses, labels):
    return [-len(response) / 50 for response in responses]


def main(steps: int = 4, n: int = 4, checkpoint: str | None = None) -> dict[str, float]:
    torch.manual_seed(0)
    policy, tokenizer = tiny_policy()
    reference = copy.deepcopy(policy)  # frozen: pair_loss's DPO term compares the policy with it

    # The bandit's context: the policy's last-layer hidden state of each prompt, randomly projected to 16 dims
    # (+1 bias). The projection is drawn from `seed`; a resume needs it, so it is saved beside the selector below.
    encoder = ContextEncoder(policy.config.hidden_size, proj_dim=16, seed=0)
    selector = RewardSelector(
        [exact_match, brevity, "noise"],  # K = 3 reward models; "noise" is a broken one the bandit should avoid
        context_dim=encoder.dim,
        bandit="linucb",  # alpha=None: LinUCB's own exploration (0.1, the paper's)
        # The paper's signal: -(DPO loss of the chosen RM's best vs. worst sample + NLL of the best). It needs the
        # scores, the SEQUENCE log-probs (summed over response tokens) of policy and reference, and the response
        # lengths: selector.feedback_inputs names them, and the loop below passes exactly those.
        # (RewardSelector's default, label-free `consensus`, needs none of these: docs/feedback.md.)
        feedback="pair_loss",
    )
    prompts, answers, domains = zip(*DATA)
    P = len(prompts)
    for step in range(steps):
        # Layout: P prompts, n consecutive samples each (sample j of prompt p is row p * n + j).
        rollout = sample(policy, tokenizer, list(prompts), n, max_new_tokens=8)
        contexts = encoder(rollout.context_hidden)  # [P, d], from the sampling prefill: no extra forward pass
        arms = selector.select(contexts, list(domains))  # [P]: one RM index per prompt
        flat_prompts, flat_responses = rollout.flat()  # [P * n] each
        labels = [a for a in answers for _ in range(n)]
        rewards = selector.score(flat_prompts, flat_responses, arms.repeat_interleave(n), labels)  # [P * n]

        # ... your GRPO / PPO update of `policy` on `rewards` goes here ...

        with torch.no_grad():
            policy_logps, lengths = sequence_logprobs(policy, rollout)  # [P * n] sums over response tokens
            ref_logps, _ = sequence_logprobs(reference, rollout)
        selector.feedback(contexts, arms, scores=rewards.view(P, n), policy_logps=policy_logps.view(P, n),
                          ref_logps=ref_logps.view(P, n), response_lengths=lengths.view(P, n))
        metrics = selector.metrics()  # laser/arm_frac/<rm>, laser/arm_entropy, laser/rm_passes, ...: log them
        chosen = ", ".join(f"{d}->{selector.names[a]}" for d, a in zip(domains, arms.tolist()))
        print(f"step {step}: {chosen}; RM passes {metrics['laser/rm_passes']:.0f} (an ensemble: {P * n * len(selector.rms)})")

    # Resume = the selector's state AND the encoder's projection (contexts must mean what they meant in training).
    checkpoint = checkpoint or os.path.join(tempfile.mkdtemp(), "laser.pt")
    torch.save({"selector": selector.state_dict(), "encoder": encoder.state_dict()}, checkpoint)
    state = torch.load(checkpoint, weights_only=True)
    resumed_encoder = ContextEncoder(policy.config.hidden_size, proj_dim=16)
    resumed_encoder.load_state_dict(state["encoder"])
    resumed = RewardSelector([exact_match, brevity, "noise"], context_dim=resumed_encoder.dim, feedback="pair_loss")
    resumed.load_state_dict(state["selector"])
    probe = encoder(rollout.context_hidden)
    assert torch.equal(resumed_encoder(rollout.context_hidden), probe)
    assert torch.equal(resumed.bandit.select(probe), selector.bandit.select(probe))  # LinUCB's choice is deterministic
    print(f"saved and resumed from {checkpoint}")
    return metrics


if __name__ == "__main__":
    main()

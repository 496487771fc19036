"""LASeR inside OpenRLHF's PPO / GRPO loop (openrlhf 0.11.x); the core (laser_rl.*) never imports OpenRLHF.

One training step:

    SamplesGenerator (vLLM, unchanged)  ->  rollout_samples, n consecutive samples per prompt
    LaserExperienceMaker.make_experience_batch
      1. contexts   LaserPolicyModelActor.laser_prompt_states: last-token hidden state of each prompt
                    (or the reference actor's, --laser.context reference), through a ContextEncoder
      2. arms       selector.select: one reward model per prompt
      3. rewards    selector.score: each prompt's n samples scored by its arm only; local RMs all live
                    in ONE LaserRewardModelActor group (GroupArm), URLs and module:function run here.
                    They land in samples.rewards, so RemoteExperienceMaker.make_experience skips its
                    own reward model (`use_reward_model = samples_list[0].rewards is None`).
      4. RemoteExperienceMaker.make_experience: actor / reference / critic forwards, unchanged
      5. feedback   from action_log_probs, base_action_log_probs or info["logprobs_diff"] and
                    action_mask, which step 4 already computed: no extra forward pass
      6. RemoteExperienceMaker.compute_advantages_and_returns: group_norm, gae, ... unchanged
    LaserPPOTrainer: selector state in the checkpoint's client_states (restored by --ckpt.load_enable),
    laser/* metrics to OpenRLHF's TensorBoard and wandb loggers.

Modules, split where Ray starts:
    rollout   steps 1-3 and 5 on plain tensors (LaserRollout), reward-model spec checks, token helpers
    launch    OpenRLHF's command line read from its source, Ray sharding, the OpenRLHF subclasses, train()
    compat    the CPU shim that lets `import openrlhf.models` work without CUDA
Importing any of them needs neither OpenRLHF nor vLLM.
"""

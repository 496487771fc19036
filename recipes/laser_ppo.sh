#!/usr/bin/env bash
# LASeR + PPO (OpenRLHF gae, a critic) on one 8-GPU node: Ray, vLLM engines, DeepSpeed ZeRO-3 and the
# colocated hybrid engine (policy, critic, reference, the K reward models and vLLM share every GPU).
# For each prompt a LinUCB bandit picks ONE of the reward models to score its samples; without group
# normalization RMs on different scales matter, so their scores are standardized per RM.
#
#   bash recipes/laser_ppo.sh [--dry-run] [more train_ppo_ray / --laser.* flags ...]
#
#   --dry-run      print the resolved command and start nothing
#   more flags     appended last, so they override the defaults below
#
# Models and data (environment variables; reward models are local directories, hub ids are not
# downloaded: huggingface-cli download HuggingFaceH4/zephyr-7b-alpha --local-dir $MODEL_ROOT/zephyr-7b-alpha):
#   MODEL_ROOT     default $HOME/models
#   POLICY         default $MODEL_ROOT/Meta-Llama-3-8B-Instruct (also the critic's starting point)
#   REWARD_MODELS  space-separated specs, default: the paper's four chat models as implicit RMs
#                  implicit:$MODEL_ROOT/{zephyr-7b-alpha,Qwen1.5-7B-Chat,Eurus-7b-kto,OLMo-7B-Instruct-hf}
#                  (also: <dir> sequence classifier, module:function, http://host:port/get_reward)
#   PROMPT_DATA    default openai/gsm8k@main, with INPUT_KEY question and LABEL_KEY answer
#   VERIFIER       optional --reward.remote_url (reward_func .py or URL): its per-sample scores drive
#                  evaluation and --laser.feedback verifier; not the training reward
#   GPUS, NNODES   default 8 GPUs on 1 node; for several nodes start Ray on each (ray start) first
#   SAVE_DIR       default laser_runs/ppo in the repository (checkpoints, TensorBoard, final model)
#
# `deepspeed recipes/laser_ppo.sh` also works: deepspeed runs this file with Python once per GPU,
# the first copy runs `bash recipes/laser_ppo.sh` and the others exit (Ray places the models).
''':'
set -euo pipefail

DRY_RUN=0
EXTRA=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n "2,27p" "${BASH_SOURCE[0]}"; exit 0 ;;
    *) EXTRA+=("$arg") ;;
  esac
done

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODEL_ROOT="${MODEL_ROOT:-$HOME/models}"
POLICY="${POLICY:-$MODEL_ROOT/Meta-Llama-3-8B-Instruct}"
REWARD_MODELS="${REWARD_MODELS:-implicit:$MODEL_ROOT/zephyr-7b-alpha implicit:$MODEL_ROOT/Qwen1.5-7B-Chat implicit:$MODEL_ROOT/Eurus-7b-kto implicit:$MODEL_ROOT/OLMo-7B-Instruct-hf}"
PROMPT_DATA="${PROMPT_DATA:-openai/gsm8k@main}"
INPUT_KEY="${INPUT_KEY:-question}"
LABEL_KEY="${LABEL_KEY:-answer}"
VERIFIER="${VERIFIER:-}"
GPUS="${GPUS:-8}"
NNODES="${NNODES:-1}"
SAVE_DIR="${SAVE_DIR:-$REPO_DIR/laser_runs/ppo}"
read -r -a RMS <<< "$REWARD_MODELS"

CMD=(
  python3 -m laser_rl.cli.train_ppo_ray
  # Placement: everything colocated on the same GPUs, vLLM and DeepSpeed sleeping in turn.
  --actor.num_nodes "$NNODES" --actor.num_gpus_per_node "$GPUS"
  --ref.num_nodes "$NNODES" --ref.num_gpus_per_node "$GPUS"
  --reward.num_nodes "$NNODES" --reward.num_gpus_per_node "$GPUS"
  --critic.num_nodes "$NNODES" --critic.num_gpus_per_node "$GPUS"
  --train.colocate_all --vllm.enable_sleep --ds.enable_sleep
  --vllm.num_engines "$((NNODES * GPUS))" --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.5
  --ds.zero_stage 3 --ds.param_dtype bf16 --ds.packing_samples --actor.gradient_checkpointing_enable
  # Models and data.
  --actor.model_name_or_path "$POLICY"
  --laser.reward_models "${RMS[@]}"
  --data.prompt_dataset "$PROMPT_DATA" --data.input_key "$INPUT_KEY" --data.label_key "$LABEL_KEY"
  --data.apply_chat_template --data.max_len 2048 --rollout.max_new_tokens 1024
  # LASeR: the paper's LinUCB (alpha 0.1, lambda 1) and pair_loss feedback, one RM per prompt.
  # pair_loss reproduces the paper; it was measured preferring the policy's own likelihood RM. Append
  # --laser.feedback consensus (label-free, the flag's default) or verifier (with VERIFIER): docs/feedback.md.
  --laser.bandit linucb --laser.alpha 0.1 --laser.lambda 1.0 --laser.feedback pair_loss
  --laser.granularity prompt --laser.context policy --laser.context_dim 256 --laser.normalize_scores
  # PPO: GAE with a critic started from the policy; n >= 2 samples per prompt for LASeR's feedback.
  --algo.advantage.estimator gae --algo.advantage.gamma 1.0 --algo.advantage.lambd 0.95
  --algo.kl.init_coef 0.01 --algo.kl.estimator k1
  --critic.model_name_or_path "$POLICY" --critic.adam.lr 9e-6
  --rollout.n_samples_per_prompt 4 --rollout.temperature 0.8 --rollout.batch_size 128 --rollout.micro_batch_size 8
  --train.batch_size 128 --train.micro_batch_size 4 --train.max_epochs 1 --train.num_episodes 1
  --actor.adam.lr 5e-7
  # Checkpoints (the bandit rides in them) and curves (laser/* beside OpenRLHF's train/*).
  --ckpt.path "$SAVE_DIR/ckpt" --ckpt.save_steps 20 --ckpt.load_enable --ckpt.output_dir "$SAVE_DIR/final"
  --logger.tensorboard_dir "$SAVE_DIR/tensorboard"
)
if [ -n "$VERIFIER" ]; then CMD+=(--reward.remote_url "$VERIFIER"); fi
CMD+=(${EXTRA[@]+"${EXTRA[@]}"})

if [ "$DRY_RUN" = 1 ]; then
  printf "%q " "${CMD[@]}"
  echo
  exit 0
fi
# Ray: train() joins the cluster in RAY_ADDRESS (or a local `ray start`), else starts one on this node.
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
exec "${CMD[@]}"
'''
import os
import sys

# Reached only when Python runs this file, as `deepspeed recipes/laser_ppo.sh` does once per GPU.
if os.environ.get("LOCAL_RANK", "0") != "0":
    sys.exit(0)
recipe = os.path.relpath(__file__)
if os.environ.get("CROSS_SIZE", "1") != "1":
    sys.exit("[laser] multi-node: run  ray start  on every node, then  bash " + recipe + "  on the head node (not deepspeed)")
print("[laser] " + recipe + " is a bash recipe (Ray places the GPUs, not deepspeed): running  bash " + recipe, flush=True)
launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE")
env = {k: v for k, v in os.environ.items() if k not in launcher}
args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
os.execvpe("bash", ["bash", os.path.abspath(__file__)] + args, env)
#'

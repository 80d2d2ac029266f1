"""GXPO inside TRL's GRPOTrainer: the stock TRL script with one import changed and two config fields.

    pip install -e ".[train,trl]"
    python examples/trl_gxpo.py                 # the tiny random model on CPU, seconds
    python examples/trl_gxpo.py --fused-loss    # and our LM-head-fused loss in place of TRL's
    python examples/trl_gxpo.py --model Qwen/Qwen2.5-0.5B-Instruct --steps 50

TRL samples, scores and computes advantages exactly as it always does; GXPO runs its passes over each
generation batch and TRL's logs gain rule/* and backward_passes.
"""

import argparse

from datasets import Dataset

from gxpo_kernels.trl import GXPOConfig as GRPOConfig  # was: from trl import GRPOConfig, GRPOTrainer
from gxpo_kernels.trl import GXPOTrainer as GRPOTrainer


def reward_digits(completions, **_):
    """A toy verifiable reward: the share of digits in the completion."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-random", help="tiny-random or a transformers model id / path")
    parser.add_argument("--rule", default="gxpo", choices=("grpo", "gxpo", "sfpo"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--fused-loss", action="store_true", help="our LM-head-fused loss instead of TRL's")
    parser.add_argument("--out", default="runs/trl-gxpo")
    args = parser.parse_args()

    if args.model == "tiny-random":
        from trainer.models import tiny_random_model, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        model = tiny_random_model(tokenizer)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model)
    prompts = Dataset.from_list([{"prompt": f"What is {a} + {b}? Answer with digits:"}
                                 for a in range(6) for b in range(6)])
    config = GRPOConfig(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=8, num_generations=4,
                        max_completion_length=16, learning_rate=1e-4, logging_steps=1, report_to=[], save_steps=2,
                        use_cpu=args.model == "tiny-random", bf16=False,
                        update_rule=args.rule, rule_preset=None,  # each rule's default preset
                        rule_micro_batches=2, fused_loss=args.fused_loss, loss_type="bnpo")
    trainer = GRPOTrainer(model=model, reward_funcs=reward_digits, args=config, train_dataset=prompts,
                          processing_class=tokenizer)
    trainer.train()


if __name__ == "__main__":
    main()

"""Trainer plug-ins: published GRPO extensions, each in one of four slots (rollout allocation, prompt
construction, advantages, token mask) whose default is plain GRPO's behaviour. See trainer/slots.py."""

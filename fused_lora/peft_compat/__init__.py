"""fused_lora/peft_compat"""

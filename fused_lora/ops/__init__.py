"""fused_lora/ops"""

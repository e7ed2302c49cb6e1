"""fused_lora/cli"""

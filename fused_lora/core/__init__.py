"""fused_lora/core"""

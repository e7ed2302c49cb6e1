"""fused_lora/dispatch"""

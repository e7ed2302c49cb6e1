"""fused_lora/modules"""

"""fused_lora/core/formats"""

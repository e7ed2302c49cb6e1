"""fused_lora/torch_row"""

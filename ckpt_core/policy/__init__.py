"""Policy: when and what to save, load, export and keep (the manager, the load policy, pre-flight,
preemption); content and bytes come from the other stages.
"""

"""The torch-free runtime every deployment shares (imports only errors and tiers below it):

- plans:    plan data (Stage, Plan, check_plan, plan_text), softmax and confidence, the one stop rule
- executor: run_plan, the one plan executor (stages here, the rest handed on), and its Outcome
"""

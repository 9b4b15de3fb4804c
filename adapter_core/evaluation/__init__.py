"""Measuring what adapters remember (the data is in adapter_core.data):

  prompts    how a conversation is put before the model (a chat, or a transcript of named people)
  answering  greedy answers and gold-answer NLLs from one pass over each prompt
  metrics    containment and token F1 on content words;  dates: normalised date match
  runner     every question in every mode, scored;  report: the tables
"""

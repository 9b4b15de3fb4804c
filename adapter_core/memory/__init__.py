"""How memory is written: a user's turns -> their adapter state.

  compressor   one interface, two ways: `generator` (model.py: the GenerativeAdapter's single
               pass, with layer.py, normalize.py, windows.py, config.py, checkpoint.py) and
               `finetune` (finetune.py: a LoRA pair trained per user, on the chat and on the
               recall chats of restatement.py)
  state        AdapterState, what either writes and the replies read
  export       a state as a PEFT LoRA folder
"""

import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
model, tok = AutoModelForCausalLM.from_pretrained(sys.argv[1]), AutoTokenizer.from_pretrained(sys.argv[1])
out = model.generate(**tok("hi", return_tensors="pt"), max_new_tokens=1, do_sample=False)
print(tok.decode(out[0, -1:]))

"""The torch side: tensors from objects, the commit of a trained checkpoint, generation,
device choice and distributed set-up. Imports torch; never imported by the metadata commands.
"""

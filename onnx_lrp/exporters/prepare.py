"""placeholder"""
def prepare(model, **kwargs):
    raise NotImplementedError

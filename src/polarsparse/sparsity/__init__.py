"""polarsparse.sparsity"""

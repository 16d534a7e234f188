"""polarsparse.eval"""

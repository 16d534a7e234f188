"""polarsparse.models"""

"""polarsparse.engine"""

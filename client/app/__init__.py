"""privface-app: the Kivy face of the phone over the client core.

Screens (screens/, one .py and one .kv each) call Kivy-free controllers (controllers/),
which call client/session.py and client/pipeline. Only this package imports Kivy, and
only outside controllers/.
"""

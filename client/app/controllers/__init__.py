"""Kivy-free controllers: one per screen, plain Python over FamilySession.

Each method is synchronous and raises only PrivfaceError / OSError for the user's
mistakes; the screens run them on the app's worker thread (tasks.Worker). Nothing here
imports Kivy, so the controllers are unit-tested without a window.
"""

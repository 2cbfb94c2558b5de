"""People: members with their face counts; enroll one from photos (the detected faces
shown); rename; remove."""

from __future__ import annotations

from kivy.properties import ObjectProperty, StringProperty
from kivy.uix.boxlayout import BoxLayout

from client.app.controllers.files import join_paths
from client.app.controllers.people import EnrollView, MemberRow
from client.app.screens.base import PrivfaceScreen
from client.app.widgets import ConfirmPopup, FilePickerPopup, PromptPopup, Thumb


class MemberLine(BoxLayout):
    """One member in the list, with Rename and Remove."""

    member = StringProperty("")
    detail = StringProperty("")
    screen = ObjectProperty(None)


class PeopleScreen(PrivfaceScreen):
    title = "People"
    enroll_message = StringProperty("Pick 1-20 photos of one person; each photo gives its "
                                    "largest face.")

    def refresh(self) -> None:
        self.run(self.app.controllers.people.members, self.show_members)

    def show_members(self, rows: list[MemberRow]) -> None:
        box = self.ids.members
        box.clear_widgets()
        for row in rows:
            box.add_widget(MemberLine(member=row.name, detail=row.detail, screen=self))
        self.ids.members_note.text = (f"{len(rows)} member(s)" if rows else
                                      "Nobody yet: enroll the first member on the right.")

    def browse_photos(self) -> None:
        def picked(paths: list[str]) -> None:
            self.ids.enroll_paths.text = join_paths(paths)
        FilePickerPopup(picked, self.ids.enroll_paths.text.split(";")[0], multiple=True,
                        title="Photos of the member (tick several)").open()

    def enroll(self) -> None:
        name, paths = self.ids.enroll_name.text, self.ids.enroll_paths.text
        people = self.app.controllers.people
        count = max(1, len([p for p in paths.split(";") if p.strip()]))
        progress = self.progress({"faces": count})
        self.ids.faces.clear_widgets()
        self.run(lambda: people.enroll(name, paths, progress), self.enrolled,
                 busy=f"finding the faces and enrolling {name.strip()}...")

    def enrolled(self, view: EnrollView) -> None:
        self.enroll_message = view.message
        self.app.set_status(view.message)
        for face in view.faces:
            self.ids.faces.add_widget(Thumb(face.preview, title=face.title,
                                           caption=face.caption, ok=face.used))
        self.ids.enroll_name.text = ""
        self.ids.enroll_paths.text = ""
        self.refresh()
        self.app.refresh_family()

    def ask_rename(self, name: str) -> None:
        PromptPopup(lambda new: self.rename(name, new), title="Rename",
                    message=f"New name for {name} (every phone of the family sees it):",
                    value=name).open()

    def rename(self, old: str, new: str) -> None:
        people = self.app.controllers.people
        self.run(lambda: people.rename(old, new), lambda _r: self._changed(
            f"renamed {old} to {new.strip()}"), busy=f"renaming {old}...")

    def ask_remove(self, name: str) -> None:
        ConfirmPopup(lambda: self.remove(name), title="Remove a member",
                     message=f"Remove {name} and their encrypted faces from the family?",
                     yes_text="Remove").open()

    def remove(self, name: str) -> None:
        people = self.app.controllers.people
        self.run(lambda: people.remove(name), self._changed, busy=f"removing {name}...")

    def _changed(self, message: str) -> None:
        self.app.set_status(message)
        self.refresh()
        self.app.refresh_family()

"""The objects table of the dock widget: one row per label (colour, name, value), the active one selected."""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QAbstractItemView,
    QColorDialog,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
)

from ..errors import MedSamError


class ObjectsPanel(QGroupBox):
    """Add, rename, recolour, delete and select the objects of a segmentation session."""

    error = Signal(str)

    def __init__(self, parent: Any = None) -> None:
        super().__init__("Objects", parent)
        self.controller = None
        self._filling = False
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["", "name", "value"])
        self.table.verticalHeader().setVisible(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.Stretch)
        header.setSectionResizeMode(2, QHeaderView.ResizeToContents)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.setMaximumHeight(150)
        self.table.setToolTip("Double-click a name to rename, the colour to change it. N / Shift+N: next / previous.")
        self.add_button = QPushButton("Add object")
        self.add_button.setToolTip("A new object with the next free label value (napari's M key does the same)")
        self.delete_button = QPushButton("Delete")
        self.delete_button.setToolTip("Remove the selected object, its voxels and prompts (Ctrl+Z brings it back)")
        buttons = QHBoxLayout()
        buttons.addWidget(self.add_button)
        buttons.addWidget(self.delete_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.table)
        layout.addLayout(buttons)
        self.add_button.clicked.connect(self.add_object)
        self.delete_button.clicked.connect(self._delete)
        self.table.itemSelectionChanged.connect(self._on_row_selected)
        self.table.itemChanged.connect(self._on_item_changed)
        self.table.cellDoubleClicked.connect(self._on_double_click)
        self.set_controller(None)

    def set_controller(self, controller: Any) -> None:
        """Show the objects of ``controller``'s session (None: empty and disabled)."""
        if self.controller is not None:
            self.controller.changed.disconnect(self._on_change)
        self.controller = controller
        self.setEnabled(controller is not None)
        if controller is not None:
            controller.changed.connect(self._on_change)
        self.refresh()

    def _on_change(self, change: Any) -> None:
        if change.objects or change.active:
            self.refresh()

    def refresh(self) -> None:
        """Rebuild the rows from the session."""
        self._filling = True
        try:
            objects = [] if self.controller is None else self.controller.session.objects
            self.table.setRowCount(len(objects))
            for row, obj in enumerate(objects):
                swatch = QTableWidgetItem()
                swatch.setData(Qt.DecorationRole, QColor(*obj.color))  # a square that shows when selected too
                swatch.setFlags(Qt.ItemIsEnabled | Qt.ItemIsSelectable)
                swatch.setToolTip("double-click to change the colour")
                name = QTableWidgetItem(obj.name)
                name.setFlags(Qt.ItemIsEnabled | Qt.ItemIsSelectable | Qt.ItemIsEditable)
                value = QTableWidgetItem(str(obj.value))
                value.setFlags(Qt.ItemIsEnabled | Qt.ItemIsSelectable)
                value.setData(Qt.UserRole, obj.value)
                for column, item in enumerate((swatch, name, value)):
                    self.table.setItem(row, column, item)
            active = None if self.controller is None else self.controller.session.active
            values = [o.value for o in objects]
            if active in values:
                self.table.selectRow(values.index(active))
            else:
                self.table.clearSelection()
            self.delete_button.setEnabled(bool(objects))
        finally:
            self._filling = False

    def value_at(self, row: int) -> int | None:
        """The label value shown in ``row``."""
        item = self.table.item(row, 2)
        return None if item is None else int(item.data(Qt.UserRole))

    def add_object(self, name: str | None = None) -> int | None:
        """Add an object with the next free label value and select it; returns its value."""
        if self.controller is None:
            return None
        return self.controller.session.add_object(name or None).value

    def _delete(self) -> None:
        if self.controller is not None:
            self._guard(self.controller.delete_object)

    def _on_row_selected(self) -> None:
        if self._filling or self.controller is None:
            return
        rows = {index.row() for index in self.table.selectedIndexes()}
        if len(rows) == 1:
            value = self.value_at(rows.pop())
            if value is not None and value != self.controller.session.active:
                self._guard(self.controller.session.select, value)

    def _on_item_changed(self, item: QTableWidgetItem) -> None:
        if self._filling or self.controller is None or item.column() != 1:
            return
        value = self.value_at(item.row())
        if value is not None and not self._guard(self.controller.session.rename, value, item.text()):
            self.refresh()

    def _on_double_click(self, row: int, column: int) -> None:
        if column != 0 or self.controller is None:
            return
        value = self.value_at(row)
        color = QColorDialog.getColor(QColor(*self.controller.session.object(value).color), self, "Object colour")
        if color.isValid():
            self._guard(self.controller.session.recolor, value, (color.red(), color.green(), color.blue()))

    def _guard(self, function: Any, *args: Any) -> bool:
        try:
            function(*args)
        except MedSamError as error:
            self.error.emit(str(error))
            return False
        return True

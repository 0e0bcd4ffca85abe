"""The propagation report in a window of its own: resizable, every row and column on show.

The Propagate box keeps a small table in the dock; "Open report" shows the same rows in a
non-modal dialog the user can make as large as needed. The window follows the box's table (it is
filled again whenever the table is), and a click on a row shows that slice, as in the box.
"""

from __future__ import annotations

from typing import Any, Callable

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QAbstractItemView, QDialog, QTableWidget, QTableWidgetItem, QVBoxLayout

from .messages import MessageLabel


class ReportWindow(QDialog):
    """A resizable copy of the Propagate box's report table."""

    def __init__(self, parent: Any = None, on_row: Callable[[int], None] | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Propagation report")
        self.setModal(False)
        self.setSizeGripEnabled(True)
        self.summary = MessageLabel("")
        self.table = QTableWidget(0, 0)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.horizontalHeader().setStretchLastSection(True)
        layout = QVBoxLayout(self)
        layout.addWidget(self.summary)
        layout.addWidget(self.table)
        self.resize(560, 600)
        if on_row is not None:
            self.table.cellClicked.connect(lambda row, _column: on_row(row))

    def copy_from(self, table: QTableWidget, summary: str = "") -> None:
        """Show ``table``'s header and cells (texts, fonts, slice numbers) and ``summary``."""
        self.summary.setText(summary)
        columns = table.columnCount()
        self.table.setColumnCount(columns)
        self.table.setHorizontalHeaderLabels([table.horizontalHeaderItem(j).text() if table.horizontalHeaderItem(j)
                                              else "" for j in range(columns)])
        self.table.setRowCount(table.rowCount())
        for i in range(table.rowCount()):
            for j in range(columns):
                source = table.item(i, j)
                if source is None:
                    continue
                item = QTableWidgetItem(source.text())
                item.setData(Qt.ItemDataRole.UserRole, source.data(Qt.ItemDataRole.UserRole))
                item.setFont(source.font())
                self.table.setItem(i, j, item)
        self.table.resizeColumnsToContents()

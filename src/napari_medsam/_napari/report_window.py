"""The propagation report in a window of its own: resizable, every row and column on show.

The Propagate box keeps a small table in the dock; "Open report" shows the same rows in a
non-modal dialog the user can make as large as needed. The window follows the box's table (it is
filled again whenever the table is), and a click on a row shows that slice, as in the box.
:func:`fill_report_table` fills the box's table from a run's report rows.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from qtpy.QtCore import Qt
from qtpy.QtGui import QFont
from qtpy.QtWidgets import QAbstractItemView, QDialog, QTableWidget, QTableWidgetItem, QVBoxLayout

from .messages import MessageLabel

COLUMNS = ("slice", "kind", "area px", "IoU", "overlap", "status")
# The column added after "IoU" when the rows have one (memory engine); two lines, so the narrow
# dock's table still shows it beside the others.
OBJECT_SCORE = "object\nscore"
OBJECT_SCORE_TIP = "SAM 2's object score (a logit): above 0 the model sees the object on the slice"


def fill_report_table(table: QTableWidget, reports: Sequence[Any]) -> list:
    """One row per report row (SliceReport), in slice order, key slices in bold; returns the rows in that order.

    The "object score" column is there only when some row has one (the memory engine's runs).
    """
    rows = sorted(reports, key=lambda r: r.index)
    scored = any(getattr(r, "object_score", None) is not None for r in rows)
    columns = list(COLUMNS)
    if scored:
        columns.insert(columns.index("IoU") + 1, OBJECT_SCORE)
    table.setColumnCount(len(columns))
    table.setHorizontalHeaderLabels(columns)
    if scored:
        table.horizontalHeaderItem(columns.index(OBJECT_SCORE)).setToolTip(OBJECT_SCORE_TIP)
    table.setRowCount(len(rows))
    bold = QFont()
    bold.setBold(True)
    for i, r in enumerate(rows):
        cells = [str(r.index), r.kind, "" if r.area_px is None else str(r.area_px),
                 "" if r.score is None else f"{r.score:.2f}", "" if r.overlap is None else f"{r.overlap:.2f}",
                 "key slice" if r.kind == "key" else f"{r.front}: {r.status}"]
        if scored:
            object_score = getattr(r, "object_score", None)
            cells.insert(columns.index(OBJECT_SCORE), "" if object_score is None else f"{object_score:.2f}")
        for j, text in enumerate(cells):
            item = QTableWidgetItem(text)
            item.setData(Qt.ItemDataRole.UserRole, int(r.index))
            if r.kind == "key":
                item.setFont(bold)
            table.setItem(i, j, item)
    table.resizeColumnsToContents()
    return rows


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
        for j in range(columns):  # a header's tooltip (e.g. what the object score is) comes along
            source = table.horizontalHeaderItem(j)
            if source is not None and source.toolTip():
                self.table.horizontalHeaderItem(j).setToolTip(source.toolTip())
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

"""The objects table of the dock widget: one row per label, the active one selected.

Columns: a visibility check box with the object's colour, its name (an editable combo box that
offers the anatomical structures DICOM-SEG codes, :data:`STRUCTURE_NAMES`; free text allowed),
its label value, its volume in mL and its first-last slice along the label volume's first axis.
The measurements (:mod:`.objects_measure`) follow every session change, counting again only the
slices the change touched. **Copy table** and **Save CSV...** give the volumes as text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QAbstractItemView,
    QApplication,
    QColorDialog,
    QComboBox,
    QCompleter,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QPushButton,
    QStyledItemDelegate,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
)

from ..errors import MedSamError
from ..io.segment_types import KNOWN_STRUCTURES, default_segment
from .layers import volume_from_layer_meta
from .objects_measure import AXIS, ObjectMeasures, ObjectRow, format_ml, table_text, voxel_size_mm

# The names the picker offers: exactly the structures DICOM-SEG export codes (SNOMED CT).
STRUCTURE_NAMES: tuple[str, ...] = tuple(sorted(KNOWN_STRUCTURES))

SWATCH, NAME, VALUE, VOLUME, SLICES = range(5)
HEADERS = ("", "name", "value", "mL", "slices")
MAX_ROWS = 7  # the table grows with the objects up to this many rows, then scrolls


def code_text(name: str) -> str:
    """How DICOM-SEG export codes an object called ``name`` (for the name's tooltip)."""
    segment = default_segment(1, name)
    side = f", {segment.type_modifier.meaning}" if segment.type_modifier is not None else ""
    if segment.type.meaning == "Tissue" and segment.category.meaning == "Tissue":
        return "DICOM-SEG: not a known structure, coded as Tissue"
    return (f"DICOM-SEG: {segment.type.meaning}{side} ({segment.category.meaning}), "
            f"SNOMED CT {segment.type.value}")


class NameDelegate(QStyledItemDelegate):
    """The name column's editor: an editable combo box of the known structures (any text allowed)."""

    def createEditor(self, parent, option, index):  # noqa: N802 (Qt's name)
        combo = QComboBox(parent)
        combo.setEditable(True)
        combo.setInsertPolicy(QComboBox.NoInsert)
        combo.addItems(STRUCTURE_NAMES)
        combo.setMaxVisibleItems(16)
        completer = QCompleter(STRUCTURE_NAMES, combo)
        completer.setCaseSensitivity(Qt.CaseInsensitive)
        completer.setFilterMode(Qt.MatchContains)
        combo.setCompleter(completer)
        combo.view().setMinimumWidth(combo.view().sizeHintForColumn(0) + 24)  # the list is wider than the cell
        combo.setToolTip("Pick a structure (coded in DICOM-SEG) or type any name")
        # A name picked from the list is taken at once, as Enter would.
        combo.activated.connect(lambda _index, combo=combo: self._commit(combo))
        # Typed text is kept when the user clicks elsewhere, as in a plain text cell (the
        # delegate's own focus-out commit watches the combo, not the line edit inside it).
        combo.lineEdit().editingFinished.connect(lambda combo=combo: self._commit(combo))
        return combo

    def _commit(self, combo: QComboBox) -> None:
        self.commitData.emit(combo)
        self.closeEditor.emit(combo)

    def setEditorData(self, editor, index):  # noqa: N802
        editor.setEditText(str(index.data() or ""))
        editor.lineEdit().selectAll()  # typing replaces the name, as in a plain text cell

    def setModelData(self, editor, model, index):  # noqa: N802
        text = editor.currentText().strip()
        if text and text != index.data():
            model.setData(index, text)


class ObjectsPanel(QGroupBox):
    """Add, rename, recolour, hide, delete, select and measure the objects of a segmentation session."""

    error = Signal(str)

    def __init__(self, parent: Any = None) -> None:
        super().__init__("Objects", parent)
        self.controller = None
        self.measures: ObjectMeasures | None = None
        self.voxel_source = ""
        self._hidden: set[int] = set()
        self._rows: dict[int, int] = {}  # label value -> table row
        self._filling = False
        self.table = QTableWidget(0, len(HEADERS))
        self.table.setHorizontalHeaderLabels(list(HEADERS))
        self.table.verticalHeader().setVisible(False)
        self.table.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)  # the name column gives way instead
        self.table.setTextElideMode(Qt.ElideRight)
        self.table.setItemDelegateForColumn(NAME, NameDelegate(self.table))
        header = self.table.horizontalHeader()
        header.setMinimumSectionSize(24)
        for column in (SWATCH, VALUE, VOLUME, SLICES):
            header.setSectionResizeMode(column, QHeaderView.ResizeToContents)
        header.setSectionResizeMode(NAME, QHeaderView.Stretch)
        tips = {
            SWATCH: "Tick to show the object in the Labels layer, untick to hide it (its voxels stay). "
                    "Double-click the colour to change it.",
            NAME: "Double-click to rename: pick a structure (coded in DICOM-SEG) or type any name",
            VALUE: "The object's label value",
            VOLUME: "Volume in mL: voxel count x voxel volume",
            SLICES: f"First-last slice holding the object, along axis {AXIS} of the label volume "
                    "(axial slices for scans opened by napari-medsam; napari's slider index, from 0)",
        }
        for column, tip in tips.items():
            self.table.horizontalHeaderItem(column).setToolTip(tip)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.DoubleClicked | QAbstractItemView.EditKeyPressed)
        self.table.setToolTip("Double-click a name to rename, the colour to change it. N / Shift+N: next / previous.")
        self.add_button = QPushButton("Add object")
        self.add_button.setToolTip("A new object with the next free label value (napari's M key does the same)")
        self.delete_button = QPushButton("Delete")
        self.delete_button.setToolTip("Remove the selected object, its voxels and prompts (Ctrl+Z brings it back)")
        self.copy_button = QPushButton("Copy table")
        self.copy_button.setToolTip("Copy name, label, volume (mL), voxels and first/last slice of every object "
                                    "as tab-separated text with a header (pastes into a spreadsheet)")
        self.csv_button = QPushButton("Save CSV...")
        self.csv_button.setToolTip("Save the volumes table as a CSV file")
        layout = QVBoxLayout(self)
        layout.addWidget(self.table)
        for pair in ((self.add_button, self.delete_button), (self.copy_button, self.csv_button)):
            row = QHBoxLayout()
            for button in pair:
                row.addWidget(button)
            layout.addLayout(row)
        self.add_button.clicked.connect(self.add_object)
        self.delete_button.clicked.connect(self._delete)
        self.copy_button.clicked.connect(self.copy_table)
        self.csv_button.clicked.connect(lambda: self.save_csv())
        self.table.itemSelectionChanged.connect(self._on_row_selected)
        self.table.itemChanged.connect(self._on_item_changed)
        self.table.cellDoubleClicked.connect(self._on_double_click)
        self.set_controller(None)

    # ------------------------------------------------------------------ controller
    def set_controller(self, controller: Any) -> None:
        """Show the objects of ``controller``'s session (None: empty and disabled).

        The measurements are counted once here; after that each session change counts again only
        the slices it touched. Objects hidden in the Labels layer's colours stay hidden.
        """
        if self.controller is not None:
            self.controller.changed.disconnect(self._on_change)
        self.controller = controller
        self.measures = None
        self._hidden = set()
        self.setEnabled(controller is not None)
        if controller is not None:
            voxel, self.voxel_source = voxel_size_mm(controller.image_layer, controller.labels_layer)
            self.measures = ObjectMeasures(controller.session.labels, voxel)
            self.measures.sync(o.value for o in controller.session.objects)
            self._hidden = {o.value for o in controller.session.objects if not self._shown_in_layer(o.value)}
            controller.changed.connect(self._on_change)
        self.refresh()

    def _on_change(self, change: Any) -> None:
        measures = self.measures
        if measures is not None:
            if change.objects:
                values = [o.value for o in self.controller.session.objects]
                measures.sync(values)
                self._hidden &= set(values)
                if self._hidden:
                    self._apply_visibility()  # the controller has just rebuilt the layer's colours
            if change.regions:
                measures.update(change.regions)
        if change.objects or change.active:
            self.refresh()
        elif change.regions:
            self._show_measures()

    # ------------------------------------------------------------------ rows
    def refresh(self) -> None:
        """Rebuild the rows from the session."""
        self._filling = True
        try:
            objects = [] if self.controller is None else self.controller.session.objects
            self._rows = {obj.value: row for row, obj in enumerate(objects)}
            self.table.setRowCount(len(objects))
            for row, obj in enumerate(objects):
                swatch = QTableWidgetItem()
                swatch.setData(Qt.DecorationRole, QColor(*obj.color))  # a square that shows when selected too
                swatch.setFlags(Qt.ItemIsEnabled | Qt.ItemIsSelectable | Qt.ItemIsUserCheckable)
                swatch.setCheckState(Qt.Unchecked if obj.value in self._hidden else Qt.Checked)
                swatch.setToolTip("tick: shown, untick: hidden in the Labels layer; double-click to change the colour")
                name = QTableWidgetItem(obj.name)
                name.setFlags(Qt.ItemIsEnabled | Qt.ItemIsSelectable | Qt.ItemIsEditable)
                name.setToolTip(f"{obj.name}\n{code_text(obj.name)}\nDouble-click to rename or pick a structure.")
                value = QTableWidgetItem(str(obj.value))
                value.setFlags(Qt.ItemIsEnabled | Qt.ItemIsSelectable)
                value.setData(Qt.UserRole, obj.value)
                cells = [swatch, name, value]
                for _ in (VOLUME, SLICES):
                    item = QTableWidgetItem()
                    item.setFlags(Qt.ItemIsEnabled | Qt.ItemIsSelectable)
                    item.setTextAlignment(Qt.AlignRight | Qt.AlignVCenter)
                    cells.append(item)
                for column, item in enumerate(cells):
                    self.table.setItem(row, column, item)
            self._show_measures()
            active = None if self.controller is None else self.controller.session.active
            if active in self._rows:
                self.table.selectRow(self._rows[active])
            else:
                self.table.clearSelection()
            self._fit_height(len(objects))
            self.delete_button.setEnabled(bool(objects))
            for button in (self.copy_button, self.csv_button):
                button.setEnabled(bool(objects))
        finally:
            self._filling = False

    def _fit_height(self, rows: int) -> None:
        """As tall as 3 to MAX_ROWS rows (more rows scroll): no empty space, no scrolling for a few objects."""
        shown = min(max(rows, 3), MAX_ROWS)
        height = (self.table.horizontalHeader().sizeHint().height() + 2 * self.table.frameWidth()
                  + shown * self.table.verticalHeader().defaultSectionSize())
        self.table.setFixedHeight(height)

    def _show_measures(self) -> None:
        """Write every row's volume and slice cells from the measurements (texts only: cheap)."""
        if self.measures is None or self.controller is None:
            return
        was, self._filling = self._filling, True
        try:
            for obj in self.controller.session.objects:
                row = self._rows.get(obj.value)
                if row is None:
                    continue
                line = self.measures.row(obj.value, obj.name)
                volume, slices = self.table.item(row, VOLUME), self.table.item(row, SLICES)
                if volume is None or slices is None:
                    continue
                volume.setText(format_ml(line.volume_ml))
                volume.setToolTip(f"{line.voxels} voxels x {self.measures.voxel_mm3:.4g} mm³ "
                                  f"= {line.volume_ml:.4f} mL ({self.voxel_source})")
                if line.first is None:
                    slices.setText("-")
                    slices.setToolTip("no voxels yet")
                else:
                    slices.setText(f"{line.first}-{line.last}")
                    slices.setToolTip(f"slices {line.first} to {line.last} along axis {AXIS} "
                                      f"({line.last - line.first + 1} slices)")
        finally:
            self._filling = was

    def value_at(self, row: int) -> int | None:
        """The label value shown in ``row``."""
        item = self.table.item(row, VALUE)
        return None if item is None else int(item.data(Qt.UserRole))

    def rows(self) -> list[ObjectRow]:
        """The measurements of every object, in table order."""
        if self.controller is None or self.measures is None:
            return []
        return [self.measures.row(o.value, o.name) for o in self.controller.session.objects]

    # ------------------------------------------------------------------ visibility
    def is_visible(self, value: int) -> bool:
        """Whether object ``value`` is drawn in the Labels layer (its box ticked)."""
        return int(value) not in self._hidden

    def set_visible(self, value: int, visible: bool) -> None:
        """Show or hide object ``value`` in the Labels layer: its colour's alpha becomes 1 or 0.

        Only the drawing changes: the voxels, the export and the other objects stay as they are.
        """
        if self.controller is None or value not in self.controller.session:
            return
        value = int(value)
        if visible:
            self._hidden.discard(value)
        else:
            self._hidden.add(value)
        self._apply_visibility()
        row = self._rows.get(value)
        item = None if row is None else self.table.item(row, SWATCH)
        if item is not None:
            was, self._filling = self._filling, True
            try:
                item.setCheckState(Qt.Checked if visible else Qt.Unchecked)
            finally:
                self._filling = was

    def _shown_in_layer(self, value: int) -> bool:
        colors = getattr(self.controller.labels_layer.colormap, "color_dict", None) or {}
        rgba = colors.get(value)
        return rgba is None or float(rgba[3]) > 0

    def _apply_visibility(self) -> None:
        """Give each object's colour in the Labels layer's colormap alpha 0 (hidden) or 1 (shown)."""
        from napari.utils.colormaps import DirectLabelColormap

        layer = self.controller.labels_layer
        colors = dict(getattr(layer.colormap, "color_dict", None) or {})
        colors.setdefault(None, (0.8, 0.8, 0.8, 1.0))
        colors.setdefault(0, (0.0, 0.0, 0.0, 0.0))
        changed = False
        for obj in self.controller.session.objects:
            alpha = 0.0 if obj.value in self._hidden else 1.0
            rgba = colors.get(obj.value)
            if rgba is None:
                rgba = (*(c / 255.0 for c in obj.color), 1.0)
            if float(rgba[3]) != alpha or obj.value not in colors:
                colors[obj.value] = (*(float(c) for c in rgba[:3]), alpha)
                changed = True
        if changed:
            layer.colormap = DirectLabelColormap(color_dict=colors)

    # ------------------------------------------------------------------ export of the table
    def table_text(self, delimiter: str = "\t") -> str:
        """The table as text with a header line: name, label, volume_ml, voxels, first_slice, last_slice."""
        return table_text(self.rows(), delimiter)

    def copy_table(self) -> str:
        """Put the table on the clipboard as tab-separated text (with a header); returns the text."""
        text = self.table_text("\t")
        QApplication.clipboard().setText(text)
        return text

    def save_csv(self, path: str | Path | None = None) -> Path | None:
        """Write the table as CSV to ``path`` (asked in a file dialog when None); returns the file or None."""
        if self.controller is None:
            return None
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, "Save the objects' volumes", str(self._default_csv()),
                                                  "CSV files (*.csv);;All files (*)")
            if not path:
                return None
        path = Path(path)
        if not path.suffix:
            path = path.with_suffix(".csv")
        try:
            path.write_text(self.table_text(","), encoding="utf-8", newline="")
        except OSError as exc:
            self.error.emit(f"Could not save the volumes to {path.name}: {exc.strerror or exc}.")
            return None
        return path

    def _default_csv(self) -> Path:
        """Beside the scan, named after the label layer."""
        controller = self.controller
        volume = volume_from_layer_meta(controller.image_layer.metadata)
        folder = volume.source_path.parent if volume is not None and volume.source_path is not None else Path.home()
        stem = "".join(c if c.isalnum() or c in " ._-" else "_" for c in controller.labels_layer.name).strip()
        return folder / f"{stem or 'objects'} volumes.csv"

    # ------------------------------------------------------------------ actions
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
        if self._filling or self.controller is None:
            return
        value = self.value_at(item.row())
        if value is None:
            return
        if item.column() == SWATCH:
            self.set_visible(value, item.checkState() == Qt.Checked)
        elif item.column() == NAME and not self._guard(self.controller.session.rename, value, item.text()):
            self.refresh()

    def _on_double_click(self, row: int, column: int) -> None:
        if column != SWATCH or self.controller is None:
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

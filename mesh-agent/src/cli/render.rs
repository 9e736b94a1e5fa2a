//! The one table renderer of the CLI: aligned plain columns like kubectl's (upper-case
//! headers, no borders, three spaces between columns, one line per row, `<none>` for an empty
//! cell), so output greps, sorts and `awk`s. Columns marked wide appear only with `-o wide`.

use comfy_table::{presets::NOTHING, CellAlignment, ContentArrangement, Table};

/// A column of a table.
#[derive(Clone, Copy, Debug)]
pub struct Column {
    pub header: &'static str,
    /// Shown only with `-o wide`.
    pub wide: bool,
    /// The width a streamed row keeps the column to at least ([`Stream`]); a whole table
    /// sizes each column to its widest cell instead.
    pub width: usize,
}

/// A column always shown.
pub const fn col(header: &'static str) -> Column {
    Column {
        header,
        wide: false,
        width: 0,
    }
}

/// A column shown with `-o wide` only.
pub const fn wide(header: &'static str) -> Column {
    Column {
        wide: true,
        ..col(header)
    }
}

impl Column {
    /// The column with a streamed width of at least `width`.
    pub const fn width(self, width: usize) -> Column {
        Column { width, ..self }
    }
}

/// A cell as shown: one line (a multi-line value would break line-oriented tools), `<none>`
/// when empty.
fn cell(value: &str) -> String {
    match value.replace('\n', ",") {
        empty if empty.is_empty() => "<none>".to_owned(),
        value => value,
    }
}

/// Rows printed as they come (`flows --follow`): the header with the first row, then each
/// row padded to the columns' widths, so a stream lines up like a table.
pub struct Stream {
    columns: Vec<Column>,
    shown: Vec<usize>,
    header_done: bool,
}

impl Stream {
    pub fn new(columns: &[Column], wide: bool) -> Stream {
        Stream {
            columns: columns.to_vec(),
            shown: shown(columns, wide),
            header_done: false,
        }
    }

    /// The text of one row (one cell per column, wide ones included), the header first.
    pub fn row(&mut self, cells: Vec<String>) -> String {
        let mut out = String::new();
        if !self.header_done {
            self.header_done = true;
            let header: Vec<String> = self
                .shown
                .iter()
                .map(|&i| self.columns[i].header.to_owned())
                .collect();
            out.push_str(&self.line(&header));
        }
        let values: Vec<String> = self
            .shown
            .iter()
            .map(|&i| cell(cells.get(i).map(String::as_str).unwrap_or_default()))
            .collect();
        out.push_str(&self.line(&values));
        out
    }

    fn line(&self, values: &[String]) -> String {
        let mut line = String::new();
        for (&i, value) in self.shown.iter().zip(values) {
            let width = self.columns[i].width;
            line.push_str(&format!("{value:<width$}   "));
        }
        format!("{}\n", line.trim_end())
    }
}

/// The indices of the columns shown.
fn shown(columns: &[Column], wide: bool) -> Vec<usize> {
    (0..columns.len())
        .filter(|&i| wide || !columns[i].wide)
        .collect()
}

/// Renders `rows` (one cell per column) under `columns`; `wide` shows the wide columns too.
pub fn table(
    columns: &[Column],
    rows: impl IntoIterator<Item = Vec<String>>,
    wide: bool,
) -> String {
    let shown = shown(columns, wide);
    let mut table = Table::new();
    table
        .load_preset(NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(shown.iter().map(|&i| columns[i].header));
    for row in rows {
        table.add_row(
            shown
                .iter()
                .map(|&i| cell(row.get(i).map(String::as_str).unwrap_or_default())),
        );
    }
    for column in table.column_iter_mut() {
        column.set_padding((0, 3));
        column.set_cell_alignment(CellAlignment::Left);
    }
    let mut out = String::new();
    for line in table.lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A duration the way people read an age: `45s`, `12m`, `3h12m`, `2d4h`.
pub fn age(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3_600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_aligned_plain_and_wide_ones_only_on_request() {
        let columns = [col("NAME"), col("STATE"), wide("NODE")];
        let rows = || {
            vec![
                vec!["web".to_owned(), "active".to_owned(), "n1".to_owned()],
                vec!["api-long".to_owned(), String::new(), "a\nb".to_owned()],
            ]
        };
        assert_eq!(
            table(&columns, rows(), false),
            "NAME       STATE\nweb        active\napi-long   <none>\n"
        );
        assert_eq!(
            table(&columns, rows(), true),
            "NAME       STATE    NODE\nweb        active   n1\napi-long   <none>   a,b\n"
        );
    }

    #[test]
    fn a_stream_lines_up_from_the_first_row() {
        let columns = [col("TIME").width(6), col("VERDICT").width(9), wide("PROTO")];
        let mut stream = Stream::new(&columns, false);
        let row = |t: &str, v: &str| vec![t.to_owned(), v.to_owned(), "tcp".to_owned()];
        assert_eq!(
            stream.row(row("10:00", "forwarded")),
            "TIME     VERDICT\n10:00    forwarded\n"
        );
        assert_eq!(stream.row(row("10:01", "")), "10:01    <none>\n");
    }

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(age(45), "45s");
        assert_eq!(age(12 * 60 + 5), "12m5s");
        assert_eq!(age(3 * 3600 + 12 * 60 + 9), "3h12m");
        assert_eq!(age(2 * 86_400 + 4 * 3600 + 1), "2d4h");
    }
}

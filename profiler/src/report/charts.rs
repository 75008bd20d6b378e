//! The charts of `bench paper`'s HTML page, drawn by plotters into SVG strings: figures against
//! message size (one line per lab), and each lab's segments as a stacked bar.

use plotters::{coord::ranged1d::SegmentValue, prelude::*};

const WIDTH: u32 = 900;

/// A line through (message size, value) per lab.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// The colour of the i-th series or segment name, the same in every chart of the page.
pub fn colour(i: usize) -> RGBColor {
    let (r, g, b) = Palette99::pick(i).rgb();
    RGBColor(r, g, b)
}

pub fn hex(c: RGBColor) -> String {
    format!("#{:02x}{:02x}{:02x}", c.0, c.1, c.2)
}

/// Values against message size, x on a log scale; an empty string when there is nothing to
/// draw.
pub fn lines(title: &str, y_desc: &str, series: &[Series]) -> String {
    let points = || series.iter().flat_map(|s| s.points.iter());
    let (Some(x_min), Some(x_max)) = (
        points().map(|p| p.0).reduce(f64::min),
        points().map(|p| p.0).reduce(f64::max),
    ) else {
        return String::new();
    };
    let y_max = points().map(|p| p.1).fold(0.0, f64::max) * 1.1;
    let mut svg = String::new();
    let drawn = draw_lines(
        &mut svg,
        title,
        y_desc,
        series,
        (x_min, x_max * 1.2),
        y_max.max(1e-9),
    );
    // Drawing into a string fails only on a bug of ours (a value outside the chart).
    drawn.map_or_else(|e| format!("<p>chart {title}: {e}</p>"), |()| svg)
}

type Drawn = Result<(), Box<dyn std::error::Error>>;

fn draw_lines(
    svg: &mut String,
    title: &str,
    y_desc: &str,
    series: &[Series],
    (x_min, x_max): (f64, f64),
    y_max: f64,
) -> Drawn {
    let root = SVGBackend::with_string(svg, (WIDTH, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((x_min * 0.8..x_max).log_scale(), 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("message size (bytes)")
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()?;
    for (i, s) in series.iter().enumerate() {
        let c = colour(i);
        chart
            .draw_series(LineSeries::new(s.points.clone(), c.stroke_width(2)))?
            .label(s.name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// One bar per lab: its segments' means (us) laid end to end, each coloured by
/// `colour_of(segment name)`.
pub struct Stack {
    pub lab: String,
    pub segments: Vec<(String, f64)>,
}

pub fn stacked(title: &str, bars: &[Stack], colour_of: &dyn Fn(&str) -> RGBColor) -> String {
    if bars.is_empty() {
        return String::new();
    }
    let total = |b: &Stack| b.segments.iter().map(|s| s.1).sum::<f64>();
    let x_max = bars.iter().map(total).fold(0.0, f64::max) * 1.05;
    let mut svg = String::new();
    let height = 90 + 34 * bars.len() as u32;
    let drawn = draw_stacked(&mut svg, title, bars, colour_of, x_max.max(1e-9), height);
    drawn.map_or_else(|e| format!("<p>chart {title}: {e}</p>"), |()| svg)
}

fn draw_stacked(
    svg: &mut String,
    title: &str,
    bars: &[Stack],
    colour_of: &dyn Fn(&str) -> RGBColor,
    x_max: f64,
    height: u32,
) -> Drawn {
    let root = SVGBackend::with_string(svg, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let labs: Vec<&str> = bars.iter().map(|b| b.lab.as_str()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(170)
        .build_cartesian_2d(0.0..x_max, (0..bars.len()).into_segmented())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc("mean one-way latency (us)")
        .y_labels(bars.len())
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                labs.get(*i).map_or(String::new(), |l| l.to_string())
            }
            SegmentValue::Last => String::new(),
        })
        .draw()?;
    for (i, bar) in bars.iter().enumerate() {
        let mut start = 0.0;
        let rects = bar.segments.iter().map(|(name, mean)| {
            let mut r = Rectangle::new(
                [
                    (start, SegmentValue::Exact(i)),
                    (start + mean, SegmentValue::Exact(i + 1)),
                ],
                colour_of(name).filled(),
            );
            r.set_margin(5, 5, 0, 0);
            start += mean;
            r
        });
        chart.draw_series(rects.collect::<Vec<_>>())?;
    }
    root.present()?;
    Ok(())
}
